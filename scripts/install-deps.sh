#!/usr/bin/env bash
# Installs every Debian package the build, the tests and the scripts need, and the Python
# packages of the client and benchmark scripts. Idempotent and non-interactive; does nothing
# when everything is already there. The CUDA toolkit is expected under /usr/local/cuda.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  libboost-dev libzmq3-dev cppzmq-dev liburing-dev libyaml-cpp-dev
  libgtest-dev libgmock-dev nlohmann-json3-dev libxxhash-dev libcli11-dev
  libspdlog-dev libfmt-dev libsystemd-dev
  libpcre2-dev libsentencepiece-dev  # the tokenizer: pre-tokenizer regexes, tokenizer.model
  libcpp-httplib-dev  # the worker's HTTP server (OpenAI API, /metrics)
  python3 python3-pip
  systemd  # systemd-analyze: the install test verifies the rendered units
)
python_packages=(pyzmq numpy matplotlib tokenizers jinja2 gguf openai prometheus-client)

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-deps: Debian packages already installed"
fi

py_missing=()
for p in "${python_packages[@]}"; do
  mod=$p
  [[ $p == pyzmq ]] && mod=zmq
  [[ $p == prometheus-client ]] && mod=prometheus_client
  python3 -c "import $mod" 2>/dev/null || py_missing+=("$p")
done
if [[ ${#py_missing[@]} -gt 0 ]]; then
  echo "install-deps: installing Python packages ${py_missing[*]}"
  python3 -m pip install -q "${py_missing[@]}" 2>/dev/null ||
    python3 -m pip install -q --break-system-packages "${py_missing[@]}"
else
  echo "install-deps: Python packages already installed"
fi

if [[ ! -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  echo "install-deps: no CUDA toolkit found (/usr/local/cuda): building the CPU backend only"
fi
