#!/usr/bin/env bash
# GPU machine, after ../shared/gpu/gpu_setup.sh: install Ray's core runtime requirements that the
# image lacks, and only those (a wheel on PYTHONPATH shadows the image's copy, so present modules
# are left alone). Wheels come from a carried folder (default .stage_ray/fallback, ignored by git;
# fill it with `pip download --no-deps` of: protobuf requests urllib3 idna certifi
# charset-normalizer pyyaml packaging filelock typing-extensions). Idempotent.
set -uo pipefail
WHL=${1:-.stage_ray/fallback}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
need=()
# module:wheel-name-prefix; packaging must be >= 24.2 for ray 2.60
for pair in google.protobuf:protobuf requests:requests urllib3:urllib3 idna:idna certifi:certifi \
    charset_normalizer:charset_normalizer yaml:pyyaml filelock:filelock typing_extensions:typing_extensions; do
  mod=${pair%%:*}; whl=${pair##*:}
  python3 -c "import $mod" 2>/dev/null || need+=("$whl")
done
python3 - <<'PY' 2>/dev/null || need+=(packaging)
import packaging.version as v, packaging
assert v.Version(packaging.__version__) >= v.Version("24.2"), packaging.__version__
PY
if [ ${#need[@]} -eq 0 ]; then echo "ray deps: all present on the image"; else
  echo "ray deps missing on the image: ${need[*]} -> installing from $WHL"
  files=(); for n in "${need[@]}"; do files+=("$WHL"/"$n"-*.whl); done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --upgrade "${files[@]}"
fi
python3 -c "import ray, filelock, packaging, google.protobuf, yaml, requests, jsonschema, msgpack, click; print('ray', ray.__version__, 'protobuf', google.protobuf.__version__, 'packaging', packaging.__version__)"
