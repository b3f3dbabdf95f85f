"""Helpers the tests share (not tests themselves): graph I/O signatures, an Optimum-style KV export,
child processes for the interruption tests, INT4 checkpoint packers, the fuzz mutations."""
