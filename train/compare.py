"""`python -m train.compare`: the old name of `python -m experiments.compare`, which it runs."""

import sys

from absl import app

from experiments.compare import main, underscored_flag_names

if __name__ == "__main__":
    app.run(main, argv=underscored_flag_names(sys.argv))
