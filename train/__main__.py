"""Entry point: `python -m train --config train/configs/default.py --workdir DIR`."""

from absl import app

from train import main

app.run(main.main, flags_parser=main.parse_flags)
