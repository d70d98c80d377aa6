"""
The training script's helpers, beside train_tiny.py (which keeps the command line, the builders
and the loop). visualize.py and tools/ import from here, never from train_tiny.py.

    data.py        the four datasets as uint8 images (CIFAR-10, Fashion-MNIST, Sub-IN, synthetic), batches
    evaluation.py  the validation loss, sampling, sample grids, the loss plot, rebuilding a run's model
    quality.py     sample quality: Fréchet distance, the metric classifier (FD-cnn), FID with an Inception file
    run.py         run plumbing: one-line errors, atomic files, checkpoints, the JSONL log, Ctrl-C / SIGTERM
"""
