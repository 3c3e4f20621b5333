"""The searchable layers of a TAS supernet (DESIGN.md section 5).

Every tensor stays at the layer's full width; a narrower choice is a zero-padded tensor. Channel-wise
interpolation (CWI) is linear, so for one step "two sampled widths, their BN affines, their CWI to the
wider one and the mixing weights" fold into one (C, C) matrix and a bias: a searchable conv costs one
full-width conv plus one channel matmul, with no dynamic slicing and no retracing.
"""

import keras
import numpy as np
import tensorflow as tf

from tas_keras.models.cifar_resnet import BN_EPSILON, he_normal_fan_out


def cwi_matrix(in_width, out_width):
    """(out_width, in_width) matrix of 1-D adaptive average pooling along channels.

    Output channel j averages input channels floor(j * in / out) .. ceil((j + 1) * in / out) - 1.
    """
    matrix = np.zeros((out_width, in_width), np.float32)
    for j in range(out_width):
        start = (j * in_width) // out_width
        end = -((-(j + 1) * in_width) // out_width)
        matrix[j, start:end] = 1.0 / (end - start)
    return matrix


def transition_matrices(candidates, full_width):
    """[m, m, C, C]: entry [a, b] maps a width-candidates[a] tensor to width candidates[b] (x @ T)."""
    m = len(candidates)
    matrices = np.zeros((m, m, full_width, full_width), np.float32)
    for a, width_in in enumerate(candidates):
        for b, width_out in enumerate(candidates):
            matrices[a, b, :width_in, :width_out] = cwi_matrix(width_in, width_out).T
    return matrices


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


class SearchableConv(keras.Layer):
    """A conv whose output width is searched, with a BN affine per candidate width.

    Every searchable conv normalises with batch statistics (the supernet is only ever trained), the
    stride-2 shortcut too: the reference's search forward applies its per-candidate BN to every conv,
    although the derived network's stride-2 shortcut has no BN.

    Args:
        filters: the full width C.
        candidates: sorted candidate widths (the last is C).
        kernel_size, strides: of the conv ("same" padding, no bias).
        relu: apply ReLU after the mix.
        own_choice: hold a width distribution (alpha, if there are two candidates or more); False
            for a shortcut conv, which is given the block-output conv's sample.
        pool_first: 2x2 average pooling before the conv (the stride-2 shortcut).
    """

    def __init__(self, filters, candidates, kernel_size=3, strides=1, relu=True, own_choice=True,
                 pool_first=False, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        candidates = tuple(int(c) for c in candidates)
        if list(candidates) != sorted(set(candidates)) or candidates[-1] != filters or candidates[0] < 1:
            raise ValueError(f"{self.name}: candidates must be sorted, distinct, in 1..{filters} and end "
                             f"at {filters}, got {candidates!r}")
        self.filters, self.candidates = filters, candidates
        self.kernel_size, self.strides = kernel_size, strides
        self.relu, self.own_choice, self.pool_first = relu, own_choice, pool_first
        self.weight_decay = weight_decay
        self.transitions = tf.constant(transition_matrices(candidates, filters))
        self.candidate_widths = tf.constant(candidates, tf.float32)
        self.alpha = None

    def build(self, input_shape):
        decay = _coupled_decay(self.weight_decay)
        self.kernel = self.add_weight(
            name="kernel", shape=(self.kernel_size, self.kernel_size, input_shape[-1], self.filters),
            initializer=he_normal_fan_out(), regularizer=decay)
        m = len(self.candidates)
        self.gammas = self.add_weight(name="gammas", shape=(m, self.filters), initializer="ones",
                                      regularizer=decay)
        self.betas = self.add_weight(name="betas", shape=(m, self.filters), initializer="zeros",
                                     regularizer=decay)
        if self.own_choice and len(self.candidates) > 1:
            self.alpha = self.add_weight(name="alpha", shape=(len(self.candidates),),
                                         initializer=keras.initializers.RandomNormal(0.0, 0.01))

    def sample(self, tau, seed):
        if self.alpha is None:  # a single candidate: the width is fixed
            return tf.zeros([2], tf.int32), tf.constant([1.0, 0.0])
        return sample_two_widths(self.alpha, tau, seed)

    def expected_width(self):
        if self.alpha is None:
            return self.candidate_widths[0]
        return tf.reduce_sum(tf.nn.softmax(self.alpha) * self.candidate_widths)

    def argmax_index(self):
        if self.alpha is None:
            return tf.constant(0, tf.int32)
        return tf.argmax(self.alpha, output_type=tf.int32)

    def call(self, inputs, picks, weights):
        """Returns the mixed output (full width, zero beyond the wider pick) and the wider pick."""
        x = inputs
        if self.pool_first:
            x = tf.nn.avg_pool2d(x, 2, 2, "SAME")
        y = tf.nn.conv2d(x, self.kernel, self.strides, "SAME")
        wider = tf.reduce_max(picks)
        mix = tf.gather(self.transitions[:, wider], picks)  # [2, C, C]: each pick to the wider width
        matrix = tf.einsum("k,ki,kij->ij", weights, tf.gather(self.gammas, picks), mix)
        bias = tf.einsum("k,ki,kij->j", weights, tf.gather(self.betas, picks), mix)
        mean, variance = tf.nn.moments(y, axes=[0, 1, 2])
        scale = tf.math.rsqrt(variance + BN_EPSILON)
        matrix = scale[:, None] * matrix
        bias = bias - tf.linalg.matvec(matrix, mean, transpose_a=True)
        y = tf.einsum("bhwc,cd->bhwd", y, matrix) + bias
        if self.relu:
            y = tf.nn.relu(y)
        return y, wider

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "candidates": list(self.candidates),
                "kernel_size": self.kernel_size, "strides": self.strides, "relu": self.relu, "own_choice": self.own_choice, "pool_first": self.pool_first,
                "weight_decay": self.weight_decay}


class DepthMixer(keras.Layer):
    """The output of a stage: sum_j q_j * CWI(output of block d_j) over the candidate depths d_j.

    Args:
        depth_choices: the block counts the stage may keep.
        candidates: the widths a block output of this stage may have (its output conv's candidates).
    """

    def __init__(self, depth_choices, candidates, **kwargs):
        super().__init__(**kwargs)
        self.depth_choices = tuple(int(d) for d in depth_choices)
        self.candidates = tuple(int(c) for c in candidates)
        self.transitions = tf.constant(transition_matrices(self.candidates, self.candidates[-1]))

    def build(self, input_shape=None):
        self.beta = self.add_weight(name="beta", shape=(len(self.depth_choices),),
                                    initializer=keras.initializers.RandomNormal(0.0, 0.01))

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
        """`block_outputs[b]`/`block_widths[b]`: output and width index after b+1 blocks."""
        chosen = [d - 1 for d in self.depth_choices]
        wider = tf.reduce_max(tf.stack([block_widths[b] for b in chosen]))
        mixed = 0.0
        for j, b in enumerate(chosen):
            transition = self.transitions[block_widths[b], wider]
            mixed += weights[j] * tf.einsum("bhwc,cd->bhwd", block_outputs[b], transition)
        return mixed, wider

    def get_config(self):
        return {**super().get_config(), "depth_choices": list(self.depth_choices),
                "candidates": list(self.candidates)}
