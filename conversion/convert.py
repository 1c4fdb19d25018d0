"""Convert a BERT, GPT-2 or Llama checkpoint to FAVOR+; the same as ``hf-performer convert``.

    python conversion/convert.py SRC OUT --nb-features 256 [--kernel softmax] [--seed 0] \
        [--push-to-hub user/name [--private]]

``--help`` lists every option with its default.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from hf_performer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
