"""transformers' `ParcaeHFConfig` and `ParcaeForCausalLM`, registered with the Auto classes on import. Loading uses
Parcae's strict loader, generation `Parcae.generate`; unsupported options that would change the result raise."""

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import transformers
    from huggingface_hub import snapshot_download
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError("parcae.interop.hf needs Hugging Face transformers: pip install 'parcae-looped[hf]'") from err

from ..data.tokenizer import BOS, EOS, PAD
from ..model.config import ParcaeConfig
from ..model.parcae import IGNORE_INDEX, Parcae
from .hf_directory import HF_GENERATION_CONFIG, HF_MODEL_TYPE, byte_level_tokenizer_json, write_hf_config
from .official import from_parcae_lm
from .official_files import is_parcae_lm_directory, read_parcae_lm

_FIELDS = tuple(f.name for f in dataclasses.fields(ParcaeConfig))
_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...]] = {  # options we do not implement → values that change nothing (or None)
    **dict.fromkeys(("num_beams", "num_beam_groups", "num_return_sequences"), (1,)),
    **dict.fromkeys(("typical_p", "repetition_penalty", "encoder_repetition_penalty", "guidance_scale"), (1.0,)),
    **dict.fromkeys(("epsilon_cutoff", "eta_cutoff", "diversity_penalty"), (0.0,)),
    **dict.fromkeys(("no_repeat_ngram_size", "min_length", "min_new_tokens"), (0,)),
    **dict.fromkeys(("output_scores", "output_logits", "output_attentions", "output_hidden_states"), (False,)),
    "return_dict_in_generate": (False,),
    **dict.fromkeys(("min_p", "top_h", "penalty_alpha", "bad_words_ids", "force_words_ids", "sequence_bias"), ()),
    **dict.fromkeys(("suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id"), ()),
    **dict.fromkeys(("exponential_decay_length_penalty", "max_time", "stop_strings", "watermarking_config"), ()),
}
_IGNORED_LOAD_KWARGS = {"_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "low_cpu_mem_usage"}
_IGNORED_LOAD_KWARGS |= {"attn_implementation", "use_safetensors", "output_loading_info", "code_revision"}
_PARCAE_OPTIONS = ("num_steps", "seed", "vocab_limit", "kv_policy", "exit", "state_seed", "attention_mask")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class ParcaeHFConfig(transformers.PretrainedConfig):
    """A `ParcaeConfig` (same fields, same validation) as a transformers config; HF names map onto ours."""

    model_type = HF_MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads"}  # noqa: RUF012 - HF names → ours
    attribute_map |= {"num_key_value_heads": "n_kv_heads", "intermediate_size": "d_mlp"}
    attribute_map |= {"max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_embeddings"}

    def __init__(self, **kwargs: Any) -> None:
        ours = {name: kwargs.pop(name) for name in _FIELDS if name in kwargs}
        super().__init__(**kwargs)
        for name, value in ParcaeConfig.from_dict(ours).to_dict().items():  # validates, fills derived fields
            setattr(self, name, value)

    @classmethod
    def from_parcae_config(cls, config: ParcaeConfig) -> "ParcaeHFConfig":
        return cls(**config.to_dict())

    def to_parcae_config(self) -> ParcaeConfig:
        return ParcaeConfig.from_dict({name: getattr(self, name) for name in _FIELDS})

    @property
    def num_hidden_layers(self) -> int:
        return self.to_parcae_config().n_layers

    def to_diff_dict(self) -> dict[str, Any]:
        """What config.json holds: our fields plus the keys transformers needs to pick the classes."""
        version = {"model_type": self.model_type, "transformers_version": transformers.__version__}
        architectures = {"architectures": list(self.architectures)} if self.architectures else {}
        return {**self.to_parcae_config().to_dict(), **version, **architectures}


class ParcaeForCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """A causal LM around `Parcae` (`.model`); `num_steps=T` in `forward` and `generate` sets the test-time depth."""

    config_class = ParcaeHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012 - a transformers class attribute

    def __init__(self, config: ParcaeHFConfig, model: Parcae | None = None) -> None:
        super().__init__(config)
        self.model = model if model is not None else Parcae(config.to_parcae_config())
        self.post_init()

    @classmethod
    def from_parcae(cls, model: Parcae) -> "ParcaeForCausalLM":
        """Wrap an existing model (shares its parameters)."""
        return cls(ParcaeHFConfig.from_parcae_config(model.config), model=model).train(model.training)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Parcae initialises itself (the paper's init) when constructed; transformers' generic init must not."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        num_steps: int | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Logits [B, L, V]; with `labels` (HF convention: the input ids, shifted inside) the mean next-token CE."""
        unsupported = ("inputs_embeds", "past_key_values", "position_ids", "cache_position")
        _reject(kwargs, "forward", (*unsupported, "output_attentions", "output_hidden_states"))
        if input_ids is None:
            raise ValueError("ParcaeForCausalLM needs input_ids.")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise ValueError("padding (attention_mask with zeros) is not supported; pass prompts of equal length.")
        targets = None if labels is None else torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        out = self.model(input_ids, labels=targets, num_steps=num_steps)
        if return_dict is False:
            return (out.loss, out.logits) if out.loss is not None else (out.logits,)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    @torch.no_grad()
    def generate(
        self, inputs: Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs: Any
    ) -> Tensor:
        """`Parcae.generate`, honouring `max_new_tokens`/`max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
        `eos_token_id`(s), `pad_token_id` (fills finished rows); `_PARCAE_OPTIONS` (left-padding mask…) pass through."""
        input_ids = kwargs.pop("input_ids", inputs)
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("generate() needs input_ids as a [batch, length] tensor.")
        ours = {name: kwargs.pop(name) for name in _PARCAE_OPTIONS if name in kwargs}
        config = copy.deepcopy(generation_config or self.generation_config or GenerationConfig())
        unknown = sorted(config.update(**kwargs))
        values = {name: getattr(config, name, None) for name in _NEUTRAL_OPTIONS}
        bad = unknown + [f"{k}={v!r}" for k, v in values.items() if v is not None and v not in _NEUTRAL_OPTIONS[k]]
        if bad:
            raise ValueError(f"ParcaeForCausalLM.generate does not take {', '.join(bad)}.")
        max_length = config.max_length if config.max_length is not None else 20
        max_new = config.max_new_tokens if config.max_new_tokens is not None else max_length - input_ids.shape[1]
        stops = config.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
        saved = {name: getattr(config, name, None) for name in ("num_steps", "vocab_limit")}  # generation_config.json
        ours = {name: value for name, value in saved.items() if value is not None} | ours
        top_k = 50 if config.top_k is None else config.top_k  # unset: transformers' defaults
        top_p = 1.0 if config.top_p is None else config.top_p
        temperature = 1.0 if config.temperature is None else config.temperature
        if not config.do_sample:
            temperature, top_k, top_p = 0.0, None, 1.0  # greedy
        ours.update(stop=stops or None, pad_id=pad_id, temperature=temperature, top_k=top_k or None)
        return sample_tokens(self.model, input_ids, max(0, max_new), top_p=top_p if top_p < 1.0 else None, **ours)

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """config.json (ours + model_type), model.safetensors (tied head once), generation_config.json."""
        if not safe_serialization:
            raise ValueError("Parcae models are saved as safetensors only (safe_serialization=False is not offered).")
        if push_to_hub:
            raise ValueError("push_to_hub is not supported: save, then upload the folder with huggingface_hub.")
        _reject(kwargs, "save_pretrained", set(kwargs) - {"max_shard_size"})  # one file: no shards
        if not is_main_process:
            return
        directory = Path(save_directory)
        if directory.is_file():
            raise FileExistsError(f"{directory} is a file; save_pretrained needs a directory.")
        self.model.save_pretrained(directory)
        write_hf_config(directory, self.model.config, transformers_version=transformers.__version__)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: ParcaeHFConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | dict | None = None,
        **kwargs: Any,
    ) -> "ParcaeForCausalLM":
        """Strictly load our model directory, an official parcae-lm one (`state_init=`) or a hub id of either."""
        if model_args:
            raise ValueError("ParcaeForCausalLM.from_pretrained takes no positional model arguments.")
        hub = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
        subfolder, state_init = hub.pop("subfolder", None) or "", kwargs.pop("state_init", None)
        _reject(kwargs, "from_pretrained", set(kwargs) - _IGNORED_LOAD_KWARGS)  # moot for a one-file model
        source = str(pretrained_model_name_or_path)
        if not Path(source).is_dir():  # a hub id: download it
            if Path(source).exists() or source.startswith((".", "/")) or source.count("/") != 1:
                raise FileNotFoundError(f"{source} is not a model directory (or a hub id like 'org/name').")
            patterns = [f"{subfolder}/*" if subfolder else "*"]
            source = snapshot_download(source, allow_patterns=patterns, **{k: v for k, v in hub.items() if v})
        directory = Path(source) / subfolder
        if isinstance(device_map, dict):
            raise ValueError("device_map dicts (model sharding) are not supported; pass one device such as 'cuda'.")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(auto if device_map == "auto" else device_map or "cpu")
        requested = dtype or torch_dtype  # None or "auto": as saved (our checkpoints are fp32)
        dtype = getattr(torch, requested, None) if isinstance(requested, str) else requested
        if requested not in (None, "auto") and not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {requested!r}.")
        if is_parcae_lm_directory(directory):
            model = from_parcae_lm(*read_parcae_lm(directory), state_init=state_init, device=device, dtype=dtype)
        else:
            model = Parcae.from_pretrained(directory, device=device, dtype=dtype)
        if config is not None and config.to_parcae_config() != model.config:
            raise ValueError(f"the config passed to from_pretrained does not match {directory / 'config.json'}.")
        wrapper = cls.from_parcae(model)
        if (directory / HF_GENERATION_CONFIG).is_file():
            wrapper.generation_config = GenerationConfig.from_pretrained(directory)
        return wrapper.eval()


def sample_tokens(model: Parcae, input_ids: Tensor, max_new_tokens: int, **options: Any) -> Tensor:
    """`Parcae.generate(input_ids, max_new_tokens, **options)`'s [B, L + N] ids (`pad_id` after a row stopped)."""
    return model.generate(input_ids, max_new_tokens, **options).tokens


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """One of our tokenizers as a `PreTrainedTokenizerFast` (the byte tokenizer as the equivalent byte-level BPE)."""
    backend = HFTokenizer.from_str(byte_level_tokenizer_json()) if tokenizer.kind == "byte" else tokenizer.hf
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **specials)


def _reject(kwargs: dict[str, Any], where: str, names: set[str] | tuple[str, ...]) -> None:
    """ValueError naming the arguments in `names` that are set (not None/False)."""
    bad = sorted(name for name in names if kwargs.get(name) is not None and kwargs.get(name) is not False)
    if bad:
        raise ValueError(f"ParcaeForCausalLM.{where} does not support {', '.join(bad)}.")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "parcae" (done on import)."""
    transformers.AutoConfig.register(HF_MODEL_TYPE, ParcaeHFConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(ParcaeHFConfig, ParcaeForCausalLM, exist_ok=True)


register()

__all__ = ["ParcaeForCausalLM", "ParcaeHFConfig", "hf_tokenizer", "register", "sample_tokens"]
