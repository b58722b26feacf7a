"""EDM-Lightning: the Ensemble of Diverse Models defense against model stealing (Kariyappa et al., ICLR 2021)."""

__version__ = "0.1.0"
