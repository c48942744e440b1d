from .pipeline_edm2 import EDM2Pipeline

__all__ = ["EDM2Pipeline"]
