"""`flowtrain demo`: train on real data on a CPU in minutes and measure what was learned (see docs/demo.md).

digits.py  the data set builder (scikit-learn's load_digits → captioned PNGs, held-out test split)
score.py   the scorer (an SVC on 8×8 grey levels: prompt adherence and its ceiling)
config.py  DemoConfig (configs/demo/demo.yaml)
pipeline.py the `assemble` stage of configs/demo/pipeline.yaml (pipeline folder + latent cache from the new VAE)
run.py     wires prepare, the training pipeline (configs/demo/pipeline.yaml) and sample into one run folder
report.py  samples.png, loss_curve.png, demo_report.json
"""
