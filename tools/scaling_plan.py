"""Memory and communication plan of one expert-parallel MoE layer.

    python tools/scaling_plan.py                       # 2,048 experts over 512 cores
    python tools/scaling_plan.py --experts 64 --cores 8 --tokens-per-core 4096
    python tools/scaling_plan.py --experts 64 --cores 8 --model-dim 4096 --hidden-dim 14336 --kernels 3
                                                       # Mixtral-size SwiGLU experts

Prints weights and training state per core in both storage modes
(`expert_parallel="sharded"`: each core its own experts; `expert_parallel=True`
under `MirroredStrategy`: every expert on every core), capacity per expert, the `[e, g, c, m]` buffer each
all-to-all moves and the bytes per step, and checks the arithmetic: the
capacity is the one the layer's top-2 router asks for (`Top2Router.expert_capacity`
in training, Mesh-TF's formula), the buffers exchanged add up to the tokens'
slots, and the README's "Scaling out" numbers are these.
"""

import argparse

MIB = 2 ** 20


def plan(experts=2048, cores=512, model_dim=1024, hidden_dim=8192, tokens_per_core=2048,
         group_size=1024, capacity_factor=1.25, min_expert_capacity=4, activation_bytes=2,
         weight_bytes=2, optimizer_bytes=12, kernels=2):
    """The plan as a dict of ints and floats (see the module docstring)."""
    from tf_moe import Top2Router

    if experts % cores:
        raise ValueError(f"{experts} experts cannot be split evenly over {cores} cores.")
    local = experts // cores
    groups = -(-tokens_per_core // group_size)
    size = -(-tokens_per_core // groups)
    router = Top2Router(experts, capacity_factor_train=capacity_factor,
                        min_expert_capacity=min_expert_capacity)  # the router owns the capacity
    capacity = int(router.expert_capacity(size, training=True))
    params_per_expert = kernels * model_dim * hidden_dim  # wi [m, h] (GLU: 2) + wo [h, m]
    buffer = experts * groups * capacity * model_dim  # [e, g, c, m] on each core
    sent = buffer * (cores - 1) // cores  # the block addressed to itself stays
    result = dict(
        experts_per_core=local,
        groups_per_core=groups,
        group_size=size,
        capacity=capacity,
        slots_per_group=experts * capacity,
        choices_per_group=2 * size,
        params_per_core=local * params_per_expert,
        weights_mib_per_core=local * params_per_expert * weight_bytes / MIB,
        # Training state: f32 weights and Adam's two moments (`optimizer_bytes` per param).
        sharded_train_state_mib_per_core=local * params_per_expert * optimizer_bytes / MIB,
        mirrored_weights_gib_per_core=experts * params_per_expert * weight_bytes / 2 ** 30,
        mirrored_train_state_gib_per_core=experts * params_per_expert * optimizer_bytes / 2 ** 30,
        buffer_elements=buffer,
        buffer_mib=buffer * activation_bytes / MIB,
        sent_mib_per_all_to_all=sent * activation_bytes / MIB,
        all_to_alls_per_step=4,  # forward: in and out; backward: the same two
        sent_mib_per_step=4 * sent * activation_bytes / MIB,
        all_gather_fallback_mib=buffer * (cores - 1) * activation_bytes / MIB,
    )
    # Checks: every core receives, for its `local` experts, `c` slots of every
    # group of every core: exactly the buffer it sent.
    assert local * cores * groups * capacity * model_dim == buffer
    assert result["slots_per_group"] >= capacity * experts
    # Sharded storage is the mirrored one divided by the cores.
    assert abs(result["sharded_train_state_mib_per_core"] * cores * MIB
               - result["mirrored_train_state_gib_per_core"] * 2 ** 30) < 1e-3
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=2048)
    parser.add_argument("--cores", type=int, default=512)
    parser.add_argument("--model-dim", type=int, default=1024)
    parser.add_argument("--hidden-dim", type=int, default=8192)
    parser.add_argument("--tokens-per-core", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=1024)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--kernels", type=int, default=2, help="3 for GLU experts")
    args = parser.parse_args()
    result = plan(args.experts, args.cores, args.model_dim, args.hidden_dim,
                  args.tokens_per_core, args.group_size, args.capacity_factor,
                  kernels=args.kernels)
    for key, value in result.items():
        print(f"{key:32s} {value:,.2f}" if isinstance(value, float) else f"{key:32s} {value:,}")


if __name__ == "__main__":
    main()
