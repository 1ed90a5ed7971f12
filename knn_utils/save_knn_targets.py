"""snake_case name of knn_utils/saveKNNMulti.py (same flags): ``python -m knn_utils.save_knn_targets --help``."""

from knn_utils.saveKNNMulti import main
from utils.cli import run

if __name__ == "__main__":
    run(main)
