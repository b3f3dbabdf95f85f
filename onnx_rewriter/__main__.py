import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the imports run: one line, as later
    print("error: interrupted; no output was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
