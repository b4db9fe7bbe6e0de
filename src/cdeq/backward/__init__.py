"""The backward passes of a DEQ: implicit differentiation (torchdeq paper Eq. 2-3), phantom
gradients (Eq. 4-6) and backpropagation through unrolled damped fixed-point steps."""
from cdeq.backward.implicit import NonFiniteBackwardError, implicit_backward, vjp_function
from cdeq.backward.phantom import phantom_steps, straight_through
from cdeq.backward.unroll import unrolled_solve

__all__ = ["NonFiniteBackwardError", "implicit_backward", "phantom_steps", "straight_through", "unrolled_solve",
           "vjp_function"]
