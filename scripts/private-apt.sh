# Sourced by the scripts that fetch a newer QEMU (fetch-qemu-sid.sh, fetch-qemu-backports.sh):
# a private apt state in a cache folder, with the Debian mirror this machine's apt already
# uses (never a host name of our own) and the suites the caller names.
#   private_apt_setup CACHE NAME SUITE...   -> sets $apt_opts, runs `apt-get update`
# NAME prefixes error messages.  Nothing is installed system-wide.
private_apt_setup() {
    _cache=$1 _name=$2
    shift 2
    command -v apt-get >/dev/null || { echo "$_name: apt-get is needed" >&2; exit 1; }
    command -v dpkg-deb >/dev/null || { echo "$_name: dpkg-deb is needed" >&2; exit 1; }
    mkdir -p "$_cache/lists/partial" "$_cache/archives/partial" "$_cache/debs" "$_cache/root"
    _mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1)
    [ -n "$_mirror" ] || _mirror=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$_mirror" ] || { echo "$_name: no Debian mirror configured in apt" >&2; exit 1; }
    _mirror=${_mirror%% *}
    : > "$_cache/sources.list"
    for _suite in "$@"; do
        echo "deb $_mirror $_suite main" >> "$_cache/sources.list"
    done
    apt_opts="-o Dir::Etc::SourceList=$_cache/sources.list -o Dir::Etc::SourceParts=/dev/null \
-o Dir::State::Lists=$_cache/lists -o Dir::Cache=$_cache -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
    # shellcheck disable=SC2086
    apt-get $apt_opts update -qq >&2
}
