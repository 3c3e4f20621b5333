"""The searchable layers of a TAS supernet (docs/design.md section 5).

Every tensor stays at its layer's full width C; a narrower choice is a zero-padded tensor, and its width
(the number of leading channels that may be non-zero) travels beside it as a channel count. There is
no dynamic slicing, so nothing retraces.

Under a mixed dtype policy (`tas_keras.precision`) the convs and the depth mix run in the compute
dtype, while the architecture parameters and the per-step mix (batch statistics, BN affines, CWI
coefficients, mixing weights) stay float32: these layers create their variables without autocasting
and cast what they hand to a conv or a matmul themselves.

Channel-wise interpolation (CWI) only ever widens in a supernet (a sampled width to the wider of the two
picks, a block output to the widest depth), and widening from a to b >= a channels averages one or two
input channels per output channel (`cwi_taps`). So for one step, "two sampled widths, their BN affines,
their CWI to the wider one and the mixing weights" is a per-channel sum of four taps of the conv's
output. A searchable conv applies it the cheapest way for its shape (`SearchableConv.cheapest_route`):
after the conv, as one (C, C) channel matmul or as two channel gathers of its output; or folded into the
conv's kernel (a gather on the kernel), which costs a second conv, or none when the batch statistics come
from the covariance of a 1x1 conv's input.
"""

import math

import keras
# Keras' output shape of a transposed conv (it exports none).
from keras.src.backend.common.backend_utils import compute_conv_transpose_output_shape
import numpy as np
import tensorflow as tf


# The BN settings of the networks the project builds and of a searchable conv's own BN where the model has
# none: PyTorch's epsilon, as the reference; momentum 0.9 rather than Keras' 0.99, whose moving statistics
# are still far off after the few hundred steps of a short run.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def he_normal_fan_out():
    """The reference's conv initialiser (PyTorch's kaiming_normal_, mode="fan_out")."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


# What one element of a memory-bound pass (a gather, an elementwise op, and their gradients) costs, in
# multiply-adds of a conv or a matmul: oneDNN's convs and matmuls run that much faster per operation on
# a CPU. Fitted to the route times `python -m bench.conv_routes` measures on this project's 2-core CPU.
ELEMENT_COST = 128


def width_mask(width, full_width):
    """float32 [full_width]: 1 on the leading `width` channels, 0 beyond."""
    return tf.cast(tf.range(full_width) < width, tf.float32)


def channel_mask(width, full_width):
    """float32 [full_width]: 1 on the channels a supernet tensor's width keeps: its leading `width`
    channels, or where `width` is itself a mask (a Concatenate's output: each input's leading channels
    at that input's offset), that mask."""
    return width if width.shape.rank == 1 else width_mask(width, full_width)


def cwi_taps(from_width, to_width, full_width):
    """The first and the last input channel that output channel j averages when CWI widens a tensor
    from `from_width` to `to_width` >= from_width channels (1-D adaptive average pooling: output j
    averages input channels floor(j * a / b) .. ceil((j + 1) * a / b) - 1, one or two of them).

    Two int32 [..., full_width] tensors (`from_width` may hold several widths on leading axes); entries
    j >= to_width are valid channel indices the caller masks.
    """
    j = tf.range(full_width)
    first = j * from_width // to_width
    last = -(-(j + 1) * from_width // to_width) - 1
    return first, last


def _scatter_columns(rows, values, full_width):
    """(C, C) matrix holding the sum of values[t, j] at (rows[t, j], j) over t."""
    columns = tf.broadcast_to(tf.range(full_width), tf.shape(rows))
    indices = tf.reshape(tf.stack([rows, columns], axis=-1), [-1, 2])
    return tf.scatter_nd(indices, tf.reshape(values, [-1]), [full_width, full_width])


def cwi_transition(from_width, to_width, full_width):
    """(C, C) matrix T: x @ T widens x (from_width channels, zero beyond) to to_width >= from_width
    channels by CWI, zero beyond."""
    first, last = cwi_taps(from_width, to_width, full_width)
    half = 0.5 * width_mask(to_width, full_width)
    return _scatter_columns(tf.stack([first, last]), tf.stack([half, half]), full_width)


def gumbel(shape, seed):
    uniform = tf.random.stateless_uniform(shape, seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
    return -tf.math.log(-tf.math.log(uniform))


def sample_two_widths(alpha, tau, seed):
    """Draws two distinct candidates of one width distribution and their mixing weights.

    Gumbel-perturbed, tau-scaled logits give pi; two candidates are drawn from pi without replacement
    (Gumbel-top-k on log(pi + 1e-7)); their weights are the softmax of the perturbed logits at the two
    picks, so gradients reach alpha through the weights only.
    """
    perturb_seed, pick_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    logits = (tf.nn.log_softmax(alpha) + gumbel(tf.shape(alpha), perturb_seed)) / tau
    keys = tf.math.log(tf.nn.softmax(logits) + 1e-7) + gumbel(tf.shape(alpha), pick_seed)
    picks = tf.stop_gradient(tf.math.top_k(keys, k=2).indices)
    return picks, tf.nn.softmax(tf.gather(logits, picks))


def gumbel_softmax(beta, tau, seed):
    """Soft depth weights: softmax((log_softmax(beta) + Gumbel noise) / tau), no sampling."""
    return tf.nn.softmax((tf.nn.log_softmax(beta) + gumbel(tf.shape(beta), seed)) / tau)


def _coupled_decay(weight_decay):
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def _checked_candidates(name, candidates):
    candidates = tuple(int(c) for c in candidates)
    if not candidates or list(candidates) != sorted(set(candidates)) or candidates[0] < 1:
        raise ValueError(f"{name}: candidates must be sorted, distinct and >= 1, got {candidates!r}")
    return candidates


class WidthChoice(keras.Layer):
    """A width distribution: logits alpha over sorted candidate widths, or none when there is a single
    candidate (the width is then fixed). `build()` creates alpha; the layer is never called."""

    def __init__(self, candidates, **kwargs):
        super().__init__(**kwargs)
        self.candidates = _checked_candidates(self.name, candidates)
        self.candidate_widths = tf.constant(self.candidates, tf.float32)
        self.alpha = None

    def build(self, input_shape=None):
        if len(self.candidates) > 1:
            self.alpha = self.add_weight(name="alpha", shape=(len(self.candidates),),
                                         initializer=keras.initializers.RandomNormal(0.0, 0.01), autocast=False)

    def sample(self, tau, seed):
        """(two candidate indices, the wider first, and their mixing weights)."""
        if self.alpha is None:  # a single candidate: the width is fixed
            return tf.zeros([2], tf.int32), tf.constant([1.0, 0.0])
        picks, weights = sample_two_widths(self.alpha, tau, seed)
        # Wider first: the convs of the slot then split a sample by unstacking it, not by slicing at a
        # tensor index, whose ops and gradient ops made most of the search step's graph.
        wider_first = tf.math.top_k(picks, k=2).indices
        return tf.gather(picks, wider_first), tf.gather(weights, wider_first)

    def expected_width(self):
        if self.alpha is None:
            return self.candidate_widths[0]
        return tf.reduce_sum(tf.nn.softmax(self.alpha) * self.candidate_widths)

    def argmax_index(self):
        if self.alpha is None:
            return tf.constant(0, tf.int32)
        return tf.argmax(self.alpha, output_type=tf.int32)

    def get_config(self):
        return {**super().get_config(), "candidates": list(self.candidates)}


class SearchableConv(keras.Layer):
    """A conv whose output width is searched: it runs at full width and mixes the two sampled widths
    (the sample of its slot's `WidthChoice`) by CWI to the wider one, each normalised with batch
    statistics and its own BN affine.

    The supernet is only ever trained, so a searchable conv normalises with batch statistics; the
    CIFAR ResNets' stride-2 shortcut too: the reference's search forward applies its per-candidate BN
    to every conv, although the derived network's stride-2 shortcut has no BN.

    Args:
        filters: the full width C.
        candidates: sorted candidate widths (the last is C).
        kernel_size, strides, padding, dilation_rate: of the conv (an int or a pair for the first two).
        normalize: batch-normalise, with an affine per candidate (gammas, betas); False mixes the
            conv's output (plus its bias) as it is.
        use_bias: a bias on the conv; only without `normalize`, where batch statistics cancel it.
        epsilon: of the normalisation.
        route: None runs every call the cheapest way for its batch (`cheapest_route`); one of `routes`
            runs every call that way.
    """

    def __init__(self, filters, candidates, kernel_size=3, strides=1, weight_decay=0.0, padding="same",
                 dilation_rate=1, normalize=True, use_bias=False, epsilon=BN_EPSILON, kernel_initializer=None,
                 route=None, **kwargs):
        super().__init__(**kwargs)
        self.candidates = _checked_candidates(self.name, candidates)
        self.candidate_channels = tf.constant(self.candidates, tf.int32)
        if self.candidates[-1] != filters:
            raise ValueError(f"{self.name}: the candidates must end at the full width {filters}, got "
                             f"{self.candidates!r}")
        if padding not in ("same", "valid"):
            raise ValueError(f"{self.name}: padding must be 'same' or 'valid', got {padding!r}")
        if normalize and use_bias:
            raise ValueError(f"{self.name}: a normalised conv has no bias (batch statistics cancel it)")
        self.filters = filters
        self.kernel_size, self.strides, self.dilation_rate = (_pair(kernel_size), _pair(strides),
                                                              _pair(dilation_rate))
        # The ways this conv can run its step: the statistics need normalisation, the covariance a 1x1 kernel.
        self.routes = (("matmul", "gather", "second_conv") + ("covariance",) * self.moments_from_input()
                       if normalize else ("matmul", "gather", "kernel"))
        if route is not None and route not in self.routes:
            raise ValueError(f"{self.name}: route must be None or one of {self.routes}, got {route!r}")
        self.route = route
        self.padding = padding
        self.normalize, self.use_bias, self.epsilon = normalize, use_bias, epsilon
        self.weight_decay = weight_decay
        self.kernel_initializer = kernel_initializer  # None: He normal (fan out), made in build()

    def build(self, input_shape):
        decay = _coupled_decay(self.weight_decay)
        self.kernel = self.add_weight(name="kernel", shape=(*self.kernel_size, input_shape[-1], self.filters),
                                      initializer=self.kernel_initializer or he_normal_fan_out(),
                                      regularizer=decay, autocast=False)
        m = len(self.candidates)
        if self.normalize:
            self.gammas = self.add_weight(name="gammas", shape=(m, self.filters), initializer="ones",
                                          regularizer=decay, autocast=False)
            self.betas = self.add_weight(name="betas", shape=(m, self.filters), initializer="zeros",
                                         regularizer=decay, autocast=False)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros",
                                        regularizer=decay, autocast=False)

    def moments_from_input(self):
        """Whether its output's batch moments follow from its input's covariance (`_input_moments`): a 1x1
        conv's do."""
        return self.kernel_size == (1, 1)

    def cheapest_route(self, positions):
        """The cheapest exact way to run a step with `positions` output pixels in the batch (None when
        the batch size is not static: the costs per pixel decide). In multiply-adds, with N = positions,
        C the full width, P = k_h * k_w * C_in and E = ELEMENT_COST, the cost of an element that a
        memory-bound op passes over, beyond the conv every route runs:
          matmul: the conv's batch statistics, then a (C, C) channel matmul: N * C^2;
          gather: the statistics, then the mix as two gathered taps of every output channel: N * 2E * C;
          second_conv: the statistics, then a conv with the mix folded into its kernel, whose two gathered
              taps pass over the kernel: N * P * C + 2E * P * C;
          covariance (1x1 convs): the statistics from the input's covariance and the kernel, then one
              conv with the mixed kernel: N * C_in^2 + C_in^2 * C + 2E * P * C;
          kernel (no normalisation, so no statistics): one conv with the mixed kernel: 2E * P * C.
        The matmul wins on many pixels of narrow convs, the gather on few pixels of wide ones (the last
        stages of an ImageNet network), the covariance on 1x1 convs that widen, over many pixels.
        """
        in_channels, full = self.kernel.shape[2], self.filters
        kernel_size = in_channels * math.prod(self.kernel_size) * full
        mixed_kernel = 2 * ELEMENT_COST * kernel_size
        costs = {"matmul": (full * full, 0), "gather": (2 * ELEMENT_COST * full, 0),  # (per position, fixed)
                 "second_conv": (kernel_size, mixed_kernel), "kernel": (0, mixed_kernel),
                 "covariance": (in_channels * in_channels, in_channels * in_channels * full + mixed_kernel)}
        if positions is None:
            return min(self.routes, key=costs.get)
        return min(self.routes, key=lambda route: costs[route][0] * positions + costs[route][1])

    def output_positions(self, x):
        """The output pixels of the batch x, or None when its size is not static."""
        if x.shape[0] is None:
            return None
        sizes = []
        for size, kernel, stride, dilation in zip(x.shape[1:3], self.kernel_size, self.strides, self.dilation_rate):
            reach = (kernel - 1) * dilation + 1
            sizes.append(-(-size // stride) if self.padding == "same" else (size - reach) // stride + 1)
        return x.shape[0] * math.prod(sizes)

    def _conv(self, x, kernel):
        """The conv of x by a float32 kernel, in x's (the compute) dtype."""
        return tf.nn.conv2d(x, tf.cast(kernel, x.dtype), self.strides, self.padding.upper(),
                            dilations=self.dilation_rate)

    def _mix(self, widths, weights, scales, shifts):
        """sum_k weights[k] * CWI_{widths[k] -> wider}(scales[k] * y + shifts[k]) as taps of y, the
        wider pick first: output channel j is diagonal[j] * y[j] + sum_t coefficients[t, j] *
        y[rows[t, j]] + bias[j], zero beyond the wider width. The wider pick's CWI is the identity (the
        diagonal); the narrower's two taps are rows [2, C] and coefficients [2, C] (identity taps too
        when both picks are equal). Returns (diagonal, rows, coefficients, bias, wider)."""
        wider, narrower = tf.unstack(widths)
        wider_weight, narrower_weight = tf.unstack(weights)
        wider_scale, narrower_scale = tf.unstack(scales)
        wider_shift, narrower_shift = tf.unstack(shifts)
        mask = width_mask(wider, self.filters)
        diagonal = wider_weight * mask * wider_scale
        rows = tf.stack(cwi_taps(narrower, wider, self.filters))
        tap_weight = 0.5 * narrower_weight * mask
        coefficients = tap_weight * tf.gather(narrower_scale, rows)
        bias = (wider_weight * mask * wider_shift
                + tf.reduce_sum(tap_weight * tf.gather(narrower_shift, rows), axis=0))
        return diagonal, rows, coefficients, bias, wider

    def _mixed_kernel(self, diagonal, rows, coefficients):
        """The kernel whose conv output is the mix `_mix` describes (without its bias)."""
        columns = tf.transpose(tf.reshape(self.kernel, [-1, self.filters]))  # [C, k_h * k_w * C_in]
        taps = tf.reshape(tf.gather(columns, tf.reshape(rows, [-1])), [2, self.filters, -1])
        mixed = columns * diagonal[:, None] + tf.reduce_sum(taps * coefficients[..., None], axis=0)
        return tf.reshape(tf.transpose(mixed), tf.shape(self.kernel))

    def _input_moments(self, x):
        """Per-channel batch mean and variance of a 1x1 conv's output, from its input's covariance
        (in float32)."""
        sampled = tf.cast(x[:, ::self.strides[0], ::self.strides[1], :], tf.float32)
        flat = tf.reshape(sampled, [-1, tf.shape(x)[-1]])
        mean = tf.reduce_mean(flat, axis=0)
        centred = flat - mean
        covariance = tf.matmul(centred, centred, transpose_a=True) / tf.cast(tf.shape(flat)[0], flat.dtype)
        kernel = tf.reshape(self.kernel, [-1, self.filters])
        variance = tf.reduce_sum(kernel * tf.matmul(covariance, kernel), axis=0)
        return tf.linalg.matvec(kernel, mean, transpose_a=True), tf.maximum(variance, 0.0)

    def call(self, inputs, picks, weights):
        """`picks`: two candidate indices, the wider first (as `WidthChoice.sample` draws them), and
        their mixing `weights`. Returns the mixed output (full width, zero beyond the wider pick) and
        the wider pick's width in channels."""
        x = inputs
        weights = tf.cast(weights, tf.float32)  # Keras casts a layer's float arguments to its compute dtype
        widths = tf.gather(self.candidate_channels, picks)
        route = self.route or self.cheapest_route(self.output_positions(x))
        if route in ("kernel", "covariance"):
            y = None  # the conv runs once, with the mixed kernel
        else:
            y = self._conv(x, self.kernel)
        if not self.normalize:
            scales = tf.ones([2, self.filters])
            shifts = tf.broadcast_to(self.bias if self.use_bias else 0.0, [2, self.filters])
        else:
            if route == "covariance":
                mean, variance = self._input_moments(x)
            else:
                # In float32, as Keras' BatchNormalization does: float16 squares overflow, bfloat16 sums lose digits.
                mean, variance = tf.nn.moments(tf.cast(y, tf.float32), axes=[0, 1, 2])
            scales = tf.gather(self.gammas, picks) * tf.math.rsqrt(variance + self.epsilon)
            shifts = tf.gather(self.betas, picks) - scales * mean
        diagonal, rows, coefficients, bias, wider = self._mix(widths, weights, scales, shifts)
        if route == "matmul":
            matrix = tf.linalg.diag(diagonal) + _scatter_columns(rows, coefficients, self.filters)
            y = tf.einsum("bhwc,cd->bhwd", y, tf.cast(matrix, y.dtype))
        elif route == "gather":
            taps = tf.gather(y, tf.reshape(rows, [-1]), axis=-1)  # [..., 2 * C]: both taps of every channel
            taps = tf.reshape(taps, tf.concat([tf.shape(y)[:-1], [2, self.filters]], axis=0))
            y = (y * tf.cast(diagonal, y.dtype)
                 + tf.reduce_sum(taps * tf.cast(coefficients, y.dtype), axis=-2))
        else:
            y = self._conv(x, self._mixed_kernel(diagonal, rows, coefficients))
        return y + tf.cast(bias, y.dtype), wider

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "candidates": list(self.candidates),
                "kernel_size": self.kernel_size, "strides": self.strides, "weight_decay": self.weight_decay,
                "padding": self.padding,
                "dilation_rate": self.dilation_rate, "normalize": self.normalize, "use_bias": self.use_bias,
                "epsilon": self.epsilon, "kernel_initializer": self.kernel_initializer and
                keras.initializers.serialize(keras.initializers.get(self.kernel_initializer)), "route": self.route}


class SearchableSeparableConv(SearchableConv):
    """A SeparableConv2D whose output width is searched: its depthwise part (`depthwise`, no bias) runs as
    it is on the zero-padded input, its pointwise part is a `SearchableConv` with a 1x1 kernel (`kernel`)
    that mixes the two sampled widths. The stride, padding and dilation are the depthwise part's."""

    def __init__(self, filters, candidates, kernel_size=3, strides=1, depth_multiplier=1, weight_decay=0.0,
                 padding="same", dilation_rate=1, depthwise_initializer=None, **kwargs):
        super().__init__(filters, candidates, kernel_size=1, strides=1, weight_decay=weight_decay, **kwargs)
        self.depthwise_settings = {"kernel_size": _pair(kernel_size), "strides": _pair(strides),
                                   "depth_multiplier": depth_multiplier, "padding": padding,
                                   "dilation_rate": _pair(dilation_rate)}
        self.depthwise_initializer = depthwise_initializer
        self.depthwise = keras.layers.DepthwiseConv2D(
            **self.depthwise_settings, use_bias=False, depthwise_initializer=depthwise_initializer or "glorot_uniform",
            depthwise_regularizer=_coupled_decay(weight_decay), dtype=self.dtype_policy, name=f"{self.name}_depthwise")

    def build(self, input_shape):
        self.depthwise.build(input_shape)
        super().build((*input_shape[:-1], input_shape[-1] * self.depthwise_settings["depth_multiplier"]))

    def call(self, inputs, picks, weights):
        return super().call(self.depthwise(inputs), picks, weights)

    def get_config(self):
        config = {**super().get_config(), **self.depthwise_settings, "depthwise_initializer":
                  self.depthwise_initializer and keras.initializers.serialize(
                      keras.initializers.get(self.depthwise_initializer))}
        return config


class SearchableConvTranspose(SearchableConv):
    """A Conv2DTranspose whose output width is searched: a `SearchableConv` whose conv is the transposed conv
    Keras' Conv2DTranspose computes (`keras.ops.conv_transpose`). Its kernel is held in a conv's layout,
    (k_h, k_w, C_in, C), so that the mix and its routes find the output channels on the last axis; the
    transposed conv reads it as Keras' (k_h, k_w, C, C_in). A strided 1x1 transposed conv leaves the output
    positions between its inputs' at zero, so its moments are not its input's covariance's: it has no
    covariance route. (Its route costs count a conv's multiply-adds per output position, s_h * s_w times
    its own: only which exact route runs depends on them.)"""

    def __init__(self, filters, candidates, output_padding=None, **kwargs):
        super().__init__(filters, candidates, **kwargs)
        self.output_padding = None if output_padding is None else _pair(output_padding)

    def moments_from_input(self):
        return False

    def output_positions(self, x):
        if x.shape[0] is None:
            return None
        return math.prod(compute_conv_transpose_output_shape(
            x.shape, self.kernel_size, self.filters, self.strides, self.padding, self.output_padding,
            dilation_rate=self.dilation_rate)[:3])

    def _conv(self, x, kernel):
        return keras.ops.conv_transpose(x, tf.cast(tf.transpose(kernel, [0, 1, 3, 2]), x.dtype), self.strides,
                                        self.padding, self.output_padding, dilation_rate=self.dilation_rate)

    def get_config(self):
        return {**super().get_config(), "output_padding": self.output_padding}


class MaskedLayerNormalization(keras.layers.LayerNormalization):
    """A LayerNormalization over the channel axis, as a supernet runs it: called on a zero-padded tensor
    and its `width` (`channel_mask`), it takes the mean and variance over the kept channels only, which are
    the narrower network's statistics (over all channels, the zeros would pull the mean towards 0 and
    shrink the variance). Channels beyond the width come out as beta: the supernet masks them.

    A sample of two widths reaches it as their mix, widened by CWI to the wider of the two (a searchable
    conv's output): it normalises the mix over the wider width, like any layer after the mix."""

    def call(self, inputs, width):
        # In float32, as keras.ops.layer_normalization computes: half-precision squares lose the variance.
        x = tf.cast(inputs, tf.float32)
        mask = channel_mask(width, x.shape[-1])
        count = tf.reduce_sum(mask)
        mean = tf.reduce_sum(x * mask, axis=-1, keepdims=True) / count
        variance = tf.reduce_sum(tf.square(x - mean) * mask, axis=-1, keepdims=True) / count
        scale = tf.math.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            scale = scale * self.gamma
        shift = -mean * scale
        if self.beta is not None:
            shift = shift + self.beta
        return tf.cast(x * scale + shift, self.compute_dtype)


class DepthMixer(keras.Layer):
    """The output of a stage: sum_j q_j * CWI(output of block d_j) over the candidate depths d_j.

    Args:
        depth_choices: the block counts the stage may keep.
        candidates: the widths a block output of this stage may have (the last is the full width).
        equal_widths: every block output has the same width (their widths are tied), so the CWI is
            the identity and is skipped.
    """

    def __init__(self, depth_choices, candidates, equal_widths=False, **kwargs):
        super().__init__(**kwargs)
        self.depth_choices = tuple(int(d) for d in depth_choices)
        self.candidates = tuple(int(c) for c in candidates)
        self.equal_widths = equal_widths

    def build(self, input_shape=None):
        self.beta = self.add_weight(name="beta", shape=(len(self.depth_choices),),
                                    initializer=keras.initializers.RandomNormal(0.0, 0.01), autocast=False)

    def sample(self, tau, seed):
        return gumbel_softmax(self.beta, tau, seed)

    def keep_probabilities(self, num_blocks):
        """P(the stage keeps at least b blocks), b = 1..num_blocks, under softmax(beta)."""
        probs = tf.nn.softmax(self.beta)
        at_least = np.array([[float(d >= b) for d in self.depth_choices]
                             for b in range(1, num_blocks + 1)], np.float32)
        return tf.linalg.matvec(at_least, probs)

    def argmax_depth(self):
        return tf.gather(tf.constant(self.depth_choices, tf.int32), tf.argmax(self.beta, output_type=tf.int32))

    def call(self, block_outputs, block_widths, weights):
        """`block_outputs[b]`/`block_widths[b]`: output and width (channels) after b+1 blocks."""
        chosen = [d - 1 for d in self.depth_choices]
        wider = tf.reduce_max(tf.stack([block_widths[b] for b in chosen]))
        mixed = 0.0
        for j, b in enumerate(chosen):
            output = block_outputs[b]
            if not self.equal_widths:
                output = tf.einsum("bhwc,cd->bhwd", output, tf.cast(
                    cwi_transition(block_widths[b], wider, self.candidates[-1]), output.dtype))
            mixed += weights[j] * output
        return mixed, wider

    def get_config(self):
        return {**super().get_config(), "depth_choices": list(self.depth_choices),
                "candidates": list(self.candidates), "equal_widths": self.equal_widths}
