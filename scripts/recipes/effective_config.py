#!/usr/bin/env python3
"""Print, as JSON, the configuration fairseq would train with, without training: runs fairseq's own
entry point (fairseq-train or fairseq-hydra-train) up to the point where it starts the training
loop, and dumps the resolved config instead (used to check a YAML against its shell recipe).

    python scripts/recipes/effective_config.py train FAIRSEQ-TRAIN-ARGS...
    python scripts/recipes/effective_config.py hydra --config-dir DIR --config-name NAME OVERRIDES...

With a model built (--build-model), the model's dimensions as built are added under "built".
"""

import json
import sys


def _dump(cfg, build):
    from omegaconf import OmegaConf, open_dict

    from fairseq import utils
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    utils.import_user_module(cfg.common)
    # what fairseq does when it sets the task and criterion up: their dataclass defaults under the
    # values given (fairseq-hydra-train filled its defaults before the plugin was imported)
    with open_dict(cfg):
        for key, reg in (("task", TASK_DATACLASS_REGISTRY), ("criterion", CRITERION_DATACLASS_REGISTRY)):
            node = cfg[key]
            if OmegaConf.is_config(node) and node.get("_name") in reg:
                cfg[key] = merge_with_parent(reg[node._name](), node)
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if build:
        from fairseq import models, tasks, utils
        from fairseq.data import Dictionary

        utils.import_user_module(cfg.common)

        class _Task:  # the model builder only needs the dictionaries
            source_dictionary = target_dictionary = Dictionary()
            for i in range(100):
                source_dictionary.add_symbol(f"w{i}")
        import torch

        with torch.device("meta"):
            m = models.build_model(cfg.model, _Task())
        enc, dec = m.encoder, m.decoder
        out["built"] = {
            "class": type(m).__name__,
            "encoder_layers": len(enc.layers), "decoder_layers": len(dec.layers),
            "encoder_embed_dim": enc.embed_tokens.embedding_dim, "decoder_embed_dim": dec.embed_tokens.embedding_dim,
            "encoder_ffn_embed_dim": enc.layers[0].fc1.out_features, "decoder_ffn_embed_dim": dec.layers[0].fc1.out_features,
            "encoder_attention_heads": enc.layers[0].self_attn.num_heads,
            "decoder_attention_heads": dec.layers[0].self_attn.num_heads,
            "shared_embeddings": enc.embed_tokens is dec.embed_tokens,
            "dropout": enc.dropout_module.p,
            "encoder_normalize_before": enc.layer_norm is not None,
        }
    print("EFFECTIVE_CONFIG " + json.dumps(out, default=str))
    sys.stdout.flush()


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    build = "--build-model" in args
    args = [a for a in args if a != "--build-model"]
    from fairseq import distributed_utils

    distributed_utils.call_main = lambda cfg, main, **kw: _dump(cfg, build)
    if mode == "train":
        from fairseq_cli import train

        sys.argv = ["fairseq-train", *args]
        train.cli_main()
    elif mode == "hydra":
        from fairseq_cli import hydra_train

        sys.argv = ["fairseq-hydra-train", *args]
        hydra_train.cli_main()
    else:
        sys.exit(f"unknown mode {mode}: train or hydra")


if __name__ == "__main__":
    main()
