import gc
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports run: one line, as later
    print("error: interrupted; no output was written", file=sys.stderr)
    sys.exit(130)

code = main()
# The process ends here: the interpreter's exit collections would walk every object the run left (0.2 s
# after a 0.5B rewrite) only for the OS to free them all at once.
gc.freeze()
sys.exit(code)
