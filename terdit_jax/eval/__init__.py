"""ADM-compatible evaluation (FID, sFID, IS, Precision/Recall) with a torch-free JAX InceptionV3.

Modules: adm_npz (ADM .npz batches, the resumable sample store), inception / weights / preprocess / features
(the network, its weights, TF1 resizing, batched features), metrics, evaluate (one call from samples to a
report), run (`--mode eval` and the demo's quality numbers), digit_classifier (the demo's class accuracy),
digit_cnn (the quantization study's evaluator), fidelity (a quantized model's samples against its full-precision
twin's).
Nothing is imported here, so reading an .npz does not load the network.
"""
