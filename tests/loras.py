"""LoRA files made in code, for the unit and integration tests."""

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(pipeline_class, model_dir: Path, dest: Path, seed: int, text_encoders=("text_encoder",)) -> Path:
    """A random (not a no-op) LoRA for the UNet and these text encoders, saved as diffusers saves one."""
    pipe = pipeline_class.from_pretrained(model_dir)
    modules = {"unet": (pipe.unet, UNET_TARGETS)}
    modules.update({name: (getattr(pipe, name), TEXT_ENCODER_TARGETS) for name in text_encoders})
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, (model, targets) in modules.items():
            # peft's own injection: transformers' add_adapter asks for a newer peft than diffusers needs.
            config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets)
            inject_adapter_in_model(config, model)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
    pipeline_class.save_lora_weights(dest, safe_serialization=True, **layers)
    return dest / "pytorch_lora_weights.safetensors"
