"""The aberration CNN: networks (registry by name), data (section preparation, noise, the HDF5
data set), training, evaluation, the :class:`~models.predictor.Predictor` the loop uses and the
shipped default model in ``weights/``."""
from autoalign.models.predictor import CheckpointError, Prediction, Predictor

__all__ = ["CheckpointError", "Prediction", "Predictor"]
