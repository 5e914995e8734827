"""ADM-compatible evaluation (FID, sFID, IS, Precision/Recall) with a torch-free JAX InceptionV3."""
from terdit_jax.eval.adm_npz import NpzArrayStream, SampleStore, read_stats, write_adm_batch
from terdit_jax.eval.evaluate import evaluate, generate_samples, reference_stats
from terdit_jax.eval.features import InceptionExtractor
from terdit_jax.eval.metrics import frechet_distance, inception_score, precision_recall
from terdit_jax.eval.weights import default_weights_path, load_inception_params
