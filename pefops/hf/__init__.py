"""transformers integration: bottleneck adapters (AdapterHub's names and semantics), mask-tuning and
side-tuning,
running on pefops' fused ops. Needs transformers only for the models themselves and safetensors for
checkpoints."""

from pefops.hf.adapters import (
    AdapterLayer,
    Fuse,
    RowRouting,
    active_adapter,
    adapter_parameters,
    add_adapter,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    train_adapter,
)
from pefops.hf.architectures import ARCHITECTURES
from pefops.hf.checkpoint import load_adapter, save_adapter
from pefops.hf.config import BottleneckConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig, resolve_config
from pefops.hf.fusion import (
    add_adapter_fusion,
    fusion_parameters,
    fusion_regularization_loss,
    load_adapter_fusion,
    remove_adapter_fusion,
    save_adapter_fusion,
    train_adapter_fusion,
)
from pefops.hf.lsh_attention import (
    apply_lsh_attention,
    configure_lsh_attention,
    register_lsh_attention,
    remove_lsh_attention,
)
from pefops.hf.mask_tuning import apply_mask_tuning, freeze_masks, load_masks, masked_modules, save_masks, set_row_masks
from pefops.hf.side_tuning import SideTunedModel, load_side, save_side, side_tune
from pefops.hf.peft_import import load_peft_prefix, load_peft_prompt
from pefops.hf.prefix_tuning import (
    PrefixTuning,
    apply_prefix_tuning,
    load_prefix,
    prefix_disabled,
    prefix_parameters,
    remove_prefix_tuning,
    save_prefix,
)
from pefops.hf.prompt_tuning import PromptTuning, apply_prompt_tuning, prompt_disabled, remove_prompt_tuning
from pefops.hf.tasks import list_tasks, load_task, set_row_tasks
from pefops.hf.training import (
    TrainingCheckpointMixin,
    is_training_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
    trainable_parameters,
)
from pefops.hf.transaction import model_transaction

__all__ = [
    "ARCHITECTURES", "AdapterLayer", "BottleneckConfig", "DoubleSeqBnConfig", "ParBnConfig", "SeqBnConfig",
    "active_adapter", "adapter_parameters", "add_adapter", "list_adapters", "load_adapter", "remove_adapter",
    "resolve_config", "save_adapter", "set_active_adapters", "train_adapter",
    "apply_mask_tuning", "freeze_masks", "load_masks", "masked_modules", "save_masks", "set_row_masks",
    "SideTunedModel", "load_side", "save_side", "side_tune",
    "apply_lsh_attention", "configure_lsh_attention", "register_lsh_attention", "remove_lsh_attention",
    "Fuse", "RowRouting", "add_adapter_fusion", "fusion_parameters", "fusion_regularization_loss", "load_adapter_fusion",
    "remove_adapter_fusion", "save_adapter_fusion", "train_adapter_fusion",
    "PrefixTuning", "PromptTuning", "apply_prefix_tuning", "apply_prompt_tuning", "load_peft_prefix", "load_peft_prompt",
    "load_prefix", "prefix_disabled", "prefix_parameters", "prompt_disabled", "remove_prefix_tuning",
    "remove_prompt_tuning", "save_prefix", "model_transaction",
    "list_tasks", "load_task", "set_row_tasks",
    "PefopsTrainer", "TrainingCheckpointMixin", "is_training_checkpoint", "load_training_checkpoint",
    "save_training_checkpoint", "trainable_parameters",
]


def __getattr__(name):
    if name == "PefopsTrainer":  # a transformers.Trainer subclass: built on first use (transformers is optional)
        from pefops.hf import training

        return training.PefopsTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
