// Command etcd is the etcd server, built from the go.etcd.io/etcd/server/v3
// version this Kubernetes release requires (its own main package lives in a
// module that is not published for every server version).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
