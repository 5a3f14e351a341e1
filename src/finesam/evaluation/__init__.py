"""Evaluation: mIoU and boundary IoU of model configurations side by side (it does not depend on training)."""

from finesam.evaluation.evaluate import (
    PROMPTS,
    Configuration,
    Result,
    adapter_configuration,
    evaluate,
    markdown_table,
    write_report,
)

__all__ = ["PROMPTS", "Configuration", "Result", "adapter_configuration", "evaluate", "markdown_table", "write_report"]
