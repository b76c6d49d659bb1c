"""Cross-entropy with instance-balanced sampling: the baseline every long-tailed paper reports."""

from ltbench.method import METHODS, LossFn, Method, MethodContext, cross_entropy


@METHODS.register("ce")
class CrossEntropy(Method):
    """Softmax cross-entropy, instance-balanced sampling (the plain baseline)."""

    def build_loss(self, ctx: MethodContext) -> LossFn:
        return cross_entropy
