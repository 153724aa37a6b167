# The cws-instrumentation image: one static binary in an empty image, like
# the published one. Used as the init container (`setup`) and, in deploy/,
# as the reference agent sidecar (`serve`).
#
# From source:      docker build -t cws-instrumentation .   (or podman build)
# Offline, from a binary built here: cargo xtask image
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask dist

FROM scratch
COPY --from=build /src/target/dist/cws-instrumentation /cws-instrumentation
CMD ["/cws-instrumentation", "health"]
