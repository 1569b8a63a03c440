"""A run in turns, for the turn tests: ``python turns_program.py READ_FD WRITE_FD NAME TURNS LOG [crash-at K]
[sleep-first S]``. Each turn appends ``NAME start|end TIME`` to LOG; ``crash-at K`` ends the process in the middle
of turn K; ``sleep-first S`` sets up for S seconds before asking for its first turn."""

import os
import sys
import time

from dyntie_cli.core.turns import PipeTurns


def main() -> None:
    read_fd, write_fd, name, turns, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    options = dict(zip(sys.argv[6::2], sys.argv[7::2]))
    time.sleep(float(options.get("sleep-first", 0)))
    player = PipeTurns(read_fd, write_fd)

    def note(what: str) -> None:
        with open(log, "a") as f:
            f.write(f"{name} {what} {time.perf_counter()}\n")

    note("ready")
    for k in range(turns):
        with player.turn():
            note("start")
            time.sleep(0.02)  # a little work, during which no other run may start a turn
            if options.get("crash-at") == str(k):
                os._exit(3)
            note("end")
    player.close()
    note("left")


if __name__ == "__main__":
    main()
