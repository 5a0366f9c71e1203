# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # fedtune in a notebook
#
# A federated learning run in a few lines, then the questions people ask first: how are the
# clients' data split, what does non-IID data cost, how many bytes does LoRA save against full
# fine-tuning, what does differential privacy cost, and how do I use the model afterwards?
#
# Everything runs on a CPU in a few minutes, offline. Each run writes a run directory
# (`metrics.csv`, `clients.csv`, `summary.json`, `model/`, `plots/`, `log.txt`);
# `fedtune.run` returns it as data. This notebook is `docs/tutorial.py` rendered by
# `python scripts/render_tutorial.py`; a test runs it top to bottom.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Image, display

import fedtune

OUT = Path("tutorial-runs")  # every run directory of this notebook goes here

# %% [markdown]
# ## 1. A federated run
#
# An MLP learns scikit-learn's handwritten digits across 10 clients. Each round, half of the
# clients train 8 local steps on their own data and the server averages their models (FedAvg).
# `engine.backend = "inprocess"` runs every client in this process: no Ray to start.
# Any key of `fedtune config` can be overridden.

# %%
DIGITS = {
    "data.dataset": "digits", "data.num_clients": 10, "data.max_examples": 0,
    "model.kind": "mlp", "model.hidden_sizes": [64],
    "client.optimizer": "sgd", "client.lr": 0.1, "client.momentum": 0.9,
    "client.local_steps": 8, "client.batch_size": 32,
    "strategy.fraction_train": 0.5, "run.rounds": 8, "engine.backend": "inprocess",
}
iid = fedtune.run(overrides={**DIGITS, "data.partitioner": "iid"}, output=OUT / "digits-iid")
iid.metrics[["round", "train_loss", "eval_accuracy", "clients_ok", "bytes_up"]]

# %%
display(Image(iid.plots["accuracy_loss"]))

# %% [markdown]
# ## 2. How the data is split
#
# `data.partitioner` decides which examples each client holds. With a Dirichlet split over
# labels (`alpha` small = strong skew) most clients see only a few digits. `partitions.csv`
# (and `result.partitions`) count the examples of each label per client.

# %%
skewed = fedtune.run(overrides={**DIGITS, "data.partitioner": "dirichlet", "data.alpha": 0.1,
                                "data.min_client_examples": 10},
                     output=OUT / "digits-dirichlet", progress=False)
display(Image(skewed.plots["partitions"]))
skewed.partitions.head()

# %% [markdown]
# ## 3. Non-IID against IID
#
# The same model, clients and rounds; only the split differs. Under label skew each client
# pulls the global model towards its own few digits, and FedAvg converges more slowly.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, result in (("IID", iid), ("Dirichlet α = 0.1", skewed)):
    ax.plot(result.metrics["round"], result.metrics["eval_accuracy"], marker="o", label=name)
ax.set(xlabel="round", ylabel="global test accuracy", title="FedAvg on digits, 10 clients")
ax.legend()
plt.show()
print(f"final accuracy: IID {iid.summary['final']['eval_accuracy']:.3f}, "
      f"Dirichlet 0.1 {skewed.summary['final']['eval_accuracy']:.3f}")

# %% [markdown]
# ## 4. LoRA against full fine-tuning: what travels
#
# A pretrained transformer (all-MiniLM-L6-v2, 22.7M parameters, shipped as a pip package)
# classifies movie review snippets as fresh or rotten. With `model.transfer = "full"` every
# client sends every weight each round; with `"lora"` it sends the LoRA adapters and the head
# only. One short round each is enough to count the bytes.

# %%
TEXT = {
    "data.dataset": "rotten_tomatoes", "data.max_examples": 600, "data.num_clients": 4,
    "strategy.fraction_train": 0.5, "strategy.fraction_evaluate": 0.0,
    "client.local_steps": 4, "run.rounds": 1, "engine.backend": "inprocess",
}
full = fedtune.run(overrides={**TEXT, "model.transfer": "full", "client.lr": 1e-4},
                   output=OUT / "minilm-full", progress=False)
lora = fedtune.run(overrides={**TEXT, "model.transfer": "lora", "client.lr": 1e-3},
                   output=OUT / "minilm-lora", progress=False)
up_full, up_lora = full.metrics["bytes_up"][0], lora.metrics["bytes_up"][0]
print(f"bytes sent up in one round: full {up_full / 1e6:.1f} MB, LoRA {up_lora / 1e6:.2f} MB "
      f"({up_full / up_lora:.0f}x fewer)")

# %% [markdown]
# ## 5. One privacy point
#
# `privacy.mode = "local"`: every client trains with DP-SGD (Opacus), clipping each example's
# gradient and adding noise so that its ε stays within `privacy.target_epsilon`. The run
# records the largest client's ε after every round.

# %%
private = fedtune.run(overrides={**DIGITS, "data.partitioner": "iid", "privacy.mode": "local",
                                 "privacy.target_epsilon": 2.0, "privacy.delta": 1e-3},
                      output=OUT / "digits-dp", progress=False)
private.metrics[["round", "eval_accuracy", "max_client_epsilon"]]

# %%
print(f"accuracy without privacy {iid.summary['final']['eval_accuracy']:.3f}, "
      f"with local DP at ε = 2: {private.summary['final']['eval_accuracy']:.3f} "
      f"(ε spent {private.metrics['max_client_epsilon'].iloc[-1]:.2f})")

# %% [markdown]
# ## 6. Use the trained model
#
# The saved global model predicts new sentences. After a single short round it is a rough
# classifier; more rounds and clients make it better (`fedtune run` reaches 0.77 accuracy).

# %%
sentences = ["A warm, funny and beautifully acted film.",
             "Dull, lifeless and far too long.",
             "The plot is thin, but the cast carries it with charm."]
model = full.load_model()
for sentence, label, p in zip(sentences, model.predict(sentences),
                              model.predict_proba(sentences)):
    print(f"{label:>6} ({p.max():.2f})  {sentence}")

# %% [markdown]
# The same folder is a Hugging Face model: transformers' own loaders read it offline. Its
# mean-pooling head is not a transformers class, so its code travels in the folder and
# `trust_remote_code=True` lets transformers use it.

# %%
from transformers import pipeline

classify = pipeline("text-classification", model=str(full.run_dir / "model"),
                    trust_remote_code=True)
for sentence, answer in zip(sentences, classify(sentences)):
    print(f"{answer['label']:>6} ({answer['score']:.2f})  {sentence}")

# %% [markdown]
# ## Next
#
# - `fedtune sweep simulations/non_iid.toml`: a grid of runs with mean ± std over seeds
#   (`fedtune.sweep` from Python).
# - `[tracking]`: `tensorboard = true` and `mlflow = true` log every round to TensorBoard and
#   MLflow.
# - `fedtune config` lists every key; `README.md` has the rest.
