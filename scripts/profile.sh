# Sourced by scripts/load, scripts/instructions, scripts/soak and (its Python
# twin) scripts/check-image-context: the cargo profile they build with.
# `release`, unless TALLYFY_PROXY_PROFILE names another: CI's smoke runs use
# `dev`, whose build `cargo test` has already made (they time nothing; a release
# build would cost CI three minutes of its fifteen).
profile=${TALLYFY_PROXY_PROFILE:-release}
case "$profile" in
  dev) profile_dir=debug ;;
  *) profile_dir=$profile ;;
esac
