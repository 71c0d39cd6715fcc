// The Gateway API conformance suite, compiled into a test binary
// (go test -c) by e2e/gateway-conformance/build.sh. Every setting comes from
// the suite's own flags (--conformance-profiles, --supported-features,
// --namespace-labels, --report-output, ...), which run.sh passes.
package suite

import (
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
)

func TestConformance(t *testing.T) {
	conformance.RunConformance(t)
}
