#!/usr/bin/env bash
# Two "hosts" on this machine: two network namespaces joined by a veth pair whose rate is limited
# with a token bucket, one torchrun node in each (c10d rendezvous at 198.18.0.1). Run as root.
#   bench/twohost.sh RATE COMMAND...      e.g. bench/twohost.sh 100mbit bench/schemes.py --batch 16
# COMMAND is what torchrun runs on each node (a script path, or -m module). The namespaces are
# always removed at the end, also on failure or Ctrl-C. TORCHRUN_ARGS adds torchrun options on both
# nodes (e.g. "--max-restarts=2"); OMP_NUM_THREADS passes through (default 1). NETEM makes the link
# lossy and slow instead of a veth, e.g.
# NETEM="--loss 0.01 --delay-ms 20 --jitter-ms 10" (bench/netem.py; the kernel here has no netem).
set -euo pipefail
rate="${1:?rate, e.g. 1gbit}"
shift
a="hpA$$" b="hpB$$" relay=""
cleanup() {
  [ -n "$relay" ] && kill "$relay" 2>/dev/null
  ip netns del "$a" 2>/dev/null || true
  ip netns del "$b" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
ip netns add "$a"
ip netns add "$b"
for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
if [ -n "${NETEM:-}" ]; then
  # A lossy, slow link (bench/netem.py: tc netem in user space, over two TUN devices).
  ready="$(mktemp -u)"
  read -ra netem <<<"$NETEM"
  "${PYTHON:-python}" "$(dirname "$0")/netem.py" --ns "$a" "$b" --tun "vA$$" "vB$$" --ready "$ready" "${netem[@]}" &
  relay=$!
  for _ in $(seq 100); do [ -e "$ready" ] && break; sleep 0.1; done
  [ -e "$ready" ] || { echo "bench/netem.py did not bring the link up" >&2; exit 1; }
  rm -f "$ready"
else
  ip link add "vA$$" type veth peer name "vB$$"
  ip link set "vA$$" netns "$a"
  ip link set "vB$$" netns "$b"
  ip -n "$a" addr add 198.18.0.1/24 dev "vA$$"
  ip -n "$b" addr add 198.18.0.2/24 dev "vB$$"
  ip -n "$a" link set "vA$$" up
  ip -n "$b" link set "vB$$" up
fi
# The bucket holds 10 ms at the rate (at least 256 kB): a smaller one caps fast links below RATE.
# The cost model knows it (costmodel.tbf_burst).
burst=$("${PYTHON:-python}" -c "from hybridpar.costmodel import tbf_burst; print(tbf_burst('$rate'))")
ip netns exec "$a" tc qdisc add dev "vA$$" root tbf rate "$rate" burst "$burst" latency 50ms
ip netns exec "$b" tc qdisc add dev "vB$$" root tbf rate "$rate" burst "$burst" latency 50ms
run_node() {  # namespace, interface, node rank, command...
  local ns="$1" ifc="$2" rank="$3"
  shift 3
  # --local-addr: the namespaces cannot reach the address the host name resolves to.
  ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifc" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes=2 --nproc_per_node=1 --node_rank="$rank" --rdzv-backend=c10d --rdzv-endpoint=198.18.0.1:29400 \
    --local-addr="198.18.0.$((rank + 1))" --rdzv-id="twohost$$" --rdzv-conf="is_host=$([ "$rank" = 0 ] && echo true || echo false)" \
    "${extra[@]}" "$@"
}
read -ra extra <<<"${TORCHRUN_ARGS:-}"
run_node "$a" "vA$$" 0 "$@" &
pa=$!
run_node "$b" "vB$$" 1 "$@" >/dev/null 2>&1 &
pb=$!
wait "$pa"
wait "$pb"
