"""EDM-Lightning entry point: ``python main.py fit --config configs/baseline.yaml``."""

from edm_lightning.cli import main

if __name__ == "__main__":
    main()
