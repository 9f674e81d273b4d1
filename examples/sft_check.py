#!/usr/bin/env python
"""How well a checkpoint answers held-out SFT prompts: the mean loss on response tokens, and greedy
answers (how many end with eos, i.e. follow the format, within --max-new-tokens). One process.

    python examples/sft_check.py --load ckpt/ --data held_out.jsonl [--show 3]
"""
import argparse

import torch
import torch.nn.functional as F

from slimtron.checkpointing import load_checkpoint, load_common
from slimtron.config import Config
from slimtron.data.sft_dataset import encode_conversation, encode_prompt, read_conversations
from slimtron.data.tokenizers import build_tokenizer
from slimtron.generation import generate
from slimtron.model import build_model_chunks
from slimtron.parallel.state import ParallelState


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--show", type=int, default=3)
    args = p.parse_args()
    _, common = load_common(args.load)
    config = Config.from_dict(common["config"])
    tok = build_tokenizer(config.data.tokenizer_type, config.data.tokenizer_model)
    model = build_model_chunks(config.model, ParallelState.single(), initialize=False)[0]
    load_checkpoint(args.load, [model], None, ParallelState.single(), config, load_optim=False,
                    load_rng=False, finetune=True)
    model.eval()
    total, count, stopped = 0.0, 0, 0
    for i, messages in enumerate(read_conversations(args.data)):
        ids, trained = encode_conversation(messages, tok)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(tokens=x[:, :-1])[0, :, :config.model.vocab_size].float()
        mask = torch.tensor(trained[1:])
        losses = F.cross_entropy(logits, x[0, 1:], reduction="none")
        total += float(losses[mask].sum())
        count += int(mask.sum())
        prompt = torch.tensor([encode_prompt(messages[:-1], tok)])
        out = generate(model, prompt, args.max_new_tokens, greedy=True, eod=tok.eos)[0]
        answer = out[prompt.shape[1]:].tolist()
        ended = tok.eos in answer
        stopped += ended
        if i < args.show:
            text = tok.detokenize(answer[:answer.index(tok.eos)] if ended else answer)
            print(f"  prompt: {messages[-2]['content']}\n  answer: {text}"
                  f"{' <eos>' if ended else ' ...(no eos)'}\n  truth:  {messages[-1]['content']}")
    n = i + 1
    print(f"sft_check {args.load}: response-token loss {total / count:.3f} over {n} held-out "
          f"prompts; {stopped}/{n} answers end with eos within {args.max_new_tokens} tokens")


if __name__ == "__main__":
    main()
