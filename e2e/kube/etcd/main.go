// Command etcd is the etcd server, built from the published
// go.etcd.io/etcd/server/v3 module. Upstream's own main package lives in the
// repository root module (go.etcd.io/etcd/v3), which is not meant to be
// consumed as a dependency; its main is exactly this one call.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
