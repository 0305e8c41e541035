"""The head contract every registered model implements (see docs/ARCHITECTURE.md).

One loader (``_builder.load_pretrained``) and one set of fine-tuning strategies work across all
families because each model names its classifier keys and can swap its head.
"""
import paddle.nn as nn


class ClassifierBase(nn.Layer):
    """Base for every registered classifier.

    Subclasses set ``classifier_prefixes`` (state_dict key prefixes of the head, e.g. ``("fc.",)``)
    and implement ``forward_features``, ``forward_head`` and ``reset_classifier``.
    """

    classifier_prefixes = ("fc.",)

    def forward_features(self, x):
        raise NotImplementedError

    def forward_head(self, x):
        raise NotImplementedError

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, class_num):
        raise NotImplementedError

    def for_export(self):
        """The layer an inference graph is traced from, holding this model's weights: the model
        itself unless its family overrides this (ResNet built NHWC exports an NCHW twin)."""
        return self

    def adapt_state_dict(self, state_dict):
        """Architecture-specific surgery on a checkpoint before keys are compared (default: none)."""
        return state_dict

    def is_classifier_key(self, key):
        return any(key.startswith(p) for p in self.classifier_prefixes)

    # Layer-wise learning-rate decay: subclasses with stages override these two.
    num_layer_ids = 2

    def layer_id(self, param_name):
        """0 for the backbone, 1 for the head, unless the family defines finer depths."""
        return self.num_layer_ids - 1 if self.is_classifier_key(param_name) else 0
