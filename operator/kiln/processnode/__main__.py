"""`python -m kiln.processnode ...` = `kiln process-node ...` (its argv[0] is the interpreter, which
`kiln local` uses to tell its own processes from recycled pids)."""

from kiln.processnode.cli import process_node

if __name__ == "__main__":
    process_node(prog_name="kiln process-node")
