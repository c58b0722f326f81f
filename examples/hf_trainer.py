"""Train a small causal language model with Arturo in a Hugging Face ``Trainer``.

Offline: the model is built from a config and the data are random tokens. The Trainer builds
its usual two param groups, runs a linear warmup (whose first step has ε = 0, a no-op for
Arturo) and accumulates gradients over two batches; the callback puts Arturo's statistics in
the Trainer's logs.

    python examples/hf_trainer.py --steps 20
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from arturo.integrations import stats_for_logging
from arturo.integrations.hf import add_stats_callback, trainer_optimizer_kwargs


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, samples: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (samples, length))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: a temp dir)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            lr_scheduler_type="linear",
            warmup_steps=max(1, args.steps // 10),
            weight_decay=0.6,  # Arturo's κ for the weights (its default); biases and norms get none
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=RandomTokens(8 * args.steps, 16, config.vocab_size),
            # Arturo's lr is the KL bound ε (its default here, per coordinate in the default
            # relative units); TrainingArguments.learning_rate is not used. In relative units
            # the Trainer's two groups (weights decayed, biases and norms not) keep one total
            # budget.
            **trainer_optimizer_kwargs(model),
        )
        add_stats_callback(trainer)  # ahead of the report_to callbacks, so they see it
        trainer.train()
    stats = stats_for_logging(trainer.optimizer)  # through Accelerate's wrapper
    print("final", {k: round(v, 6) for k, v in stats.items()})
    return stats


if __name__ == "__main__":
    main()
