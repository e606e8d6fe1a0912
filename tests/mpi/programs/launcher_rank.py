"""Rank program of the launcher tests: joins the job, says who it is, then per argv[1]:

- `wait`: waits for signals with their default actions (SIGINT: KeyboardInterrupt);
- `stubborn`: ignores SIGTERM, SIGINT, SIGHUP and SIGQUIT and waits;
- `chatter N LEN`: prints N lines of LEN characters on stdout and on stderr, each line in
  several writes, as fast as it can, then exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from guest_lib.mpi import MPI


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    mode = sys.argv[1]
    if mode == "stubborn":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
    comm.Barrier()
    print(f"rank {rank} pid {os.getpid()}", flush=True)
    if mode == "chatter":
        count, length = int(sys.argv[2]), int(sys.argv[3])
        for stream in (sys.stdout, sys.stderr):
            out = stream.buffer
            for i in range(count):
                line = b"%d:%d:" % (rank, i) + b"x" * length
                for start in range(0, len(line), 1000):  # a line in pieces: the worst case
                    out.write(line[start : start + 1000])
                    out.flush()
                out.write(b"\n")
                out.flush()
        return
    time.sleep(3600)


if __name__ == "__main__":
    main()
