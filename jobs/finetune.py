"""``python -m jobs.finetune --job-id ID`` (spec from the job store) or ``--spec FILE``.

The Ray Jobs entrypoint of a finetune job; see :mod:`jobs.entrypoint`.
"""

from jobs.entrypoint import main

if __name__ == "__main__":
    raise SystemExit(main("finetune"))
