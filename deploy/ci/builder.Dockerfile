# CI only: the build stage's image for the product Dockerfile in CI.
# The local base plus the local CPU wheel of torch, found through
# PIP_FIND_LINKS, so that the build never downloads a torch build.
ARG BASE_IMAGE=loss-service-ci/base:bookworm
FROM ${BASE_IMAGE}
COPY wheels/ /wheels/
ENV PIP_FIND_LINKS=/wheels
