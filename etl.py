#!/usr/bin/env python3
"""Fill a pgvector embedding column for every row that does not have one yet.

Rows whose embedding IS NULL are read in id ranges by parallel worker processes, embedded in
batches through any OpenAI-compatible embeddings API, and committed batch by batch; rerun
the same command to resume. Settings come from flags, the environment and config.env.

    python etl.py --workers 4 --batch-size 20
    nohup python etl.py --workers 4 --batch-size 20 > etl.log 2>&1 &

`python etl.py --help` lists every flag; README.md explains the rest.
"""

import sys

from embedfill.cli import main

if __name__ == "__main__":
    sys.exit(main())
