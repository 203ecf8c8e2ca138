"""A CFG prompt and its negative through CLIP as one batch, not one call each.

Replaces: `pare/pipelines/stable_diffusion.py StableDiffusionPipeline.encode_prompt` (diffusers:
`StableDiffusionPipeline.encode_prompt`) in the SD 1.x / 2.x pipelines that keep it, where the text encoder replays
CUDA graphs (graph.py `graph_forward`). SDXL's, with two encoders, pooled outputs and a penultimate layer, is its own.

Under classifier-free guidance (Ho & Salimans, arXiv 2207.12598) the pipeline encodes the prompt, then the negative
prompt: two CLIP calls of one 77-token sequence each. At that size CLIP is bound by its kernels' latency, not their
work (SD1.5's text encoder reads 246 MB of weights, about 0.07 ms on an H100, and runs for about 1.2 ms a call): a
call of both sequences takes about as long as one (benchmarks/NOTES.md change 48). Each row's embedding depends on
its own tokens only (CLIP's causal mask; SD passes no padding mask), so the result is the reference's up to the
rounding of the GEMMs at the other batch size, within the fp16 budget (parity_tests).

The reference runs where this does not apply: no CFG, embeddings passed in, `clip_skip` (the negative prompt is
encoded from CLIP's last layer whatever it says, the prompt from another), or negative prompts of another count.
A truncation warning names the cut parts of both in one message.
"""

from __future__ import annotations

import functools


def encode_together(pipe) -> None:
    """Set `pipe.encode_prompt` to one that encodes the prompt and its negative in one text-encoder call. Undo:
    `encode_apart`."""
    reference = functools.partial(type(pipe).encode_prompt, pipe)

    def encode_prompt(prompt, num_images_per_prompt: int, do_cfg: bool, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None, clip_skip: int | None = None):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) and isinstance(prompts, list) else negatives
        if not (do_cfg and prompt_embeds is None and negative_prompt_embeds is None and clip_skip is None
                and isinstance(prompts, list) and isinstance(negatives, list) and len(negatives) == len(prompts)):
            return reference(prompt, num_images_per_prompt, do_cfg, negative_prompt, prompt_embeds,
                             negative_prompt_embeds, clip_skip)
        both = pipe.clip_hidden_states(negatives + prompts, None)  # (2B, T, D): the negatives first, as CFG stacks
        both = both.to(dtype=pipe.text_encoder.dtype, device=pipe.device)
        negative, positive = both.chunk(2)  # 2 x (B, T, D)
        return (positive.repeat_interleave(num_images_per_prompt, dim=0),
                negative.repeat_interleave(num_images_per_prompt, dim=0))

    pipe.encode_prompt = encode_prompt  # an instance attribute, found before the class's method


def encode_apart(pipe) -> None:
    """Undo `encode_together`: the class's encode_prompt again."""
    pipe.__dict__.pop("encode_prompt", None)


def one_clip_call_each(pipe) -> bool:
    """Whether the pipeline's prompt encoding is the SD 1.x / 2.x one that `encode_together` stands for (its class
    marks it `one_clip_call_each`)."""
    return getattr(type(pipe).encode_prompt, "one_clip_call_each", False)
