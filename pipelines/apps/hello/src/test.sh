#!/bin/sh
# The app's tests, run inside its image.
set -eu
grep -q 'hello from berth' /www/index.html || { echo "FAIL: greeting missing"; exit 1; }
! grep -q '@GREETING@' /www/index.html || { echo "FAIL: template not filled"; exit 1; }
httpd -p 127.0.0.1:8081 -h /www
answer=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc 127.0.0.1 8081)
echo "$answer" | grep -q '200 OK' || { echo "FAIL: httpd did not answer"; exit 1; }
echo "PASS: 3 checks"
