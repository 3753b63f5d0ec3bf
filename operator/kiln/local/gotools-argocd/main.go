// Command argocd is Argo CD's multi-call binary with only the components the GitOps e2e runs
// (kiln/local/argocd.py): the application controller, the repo server and the git credential
// helper the repo server hands to git. Upstream's main also links the CLI, the API server, Dex,
// notifications and the ApplicationSet controller, each with its SDKs, and takes far longer to
// build. The build copies this file into Argo CD's module tree as cmd/kiln-argocd/main.go.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"k8s.io/klog/v2"

	appcontroller "github.com/argoproj/argo-cd/v3/cmd/argocd-application-controller/commands"
	gitaskpass "github.com/argoproj/argo-cd/v3/cmd/argocd-git-ask-pass/commands"
	reposerver "github.com/argoproj/argo-cd/v3/cmd/argocd-repo-server/commands"
	"github.com/argoproj/argo-cd/v3/common"
	"github.com/argoproj/argo-cd/v3/util/log"
)

// Upstream's way to pick a component without a link of that name.
const binaryNameEnv = "ARGOCD_BINARY_NAME"

func init() {
	klog.SetLogger(log.NewLogrusLogger(log.NewWithCurrentConfig()))
}

// Upstream's main first calls grpc.DisableSRVLookups, undoing the DNS SRV lookups that gRPC's grpclb
// balancer turns on when it is linked; none of these components links it, so they are off already
// (and that call panics when it finds them off).
func main() {
	name := filepath.Base(os.Args[0])
	if value := os.Getenv(binaryNameEnv); value != "" {
		name = value
	}
	var command *cobra.Command
	switch name {
	case common.CommandApplicationController:
		command = appcontroller.NewCommand()
	case common.CommandRepoServer:
		command = reposerver.NewCommand()
	case common.CommandGitAskPass:
		command = gitaskpass.NewCommand()
	default:
		fmt.Fprintf(os.Stderr, "%s: this build runs only %s, %s and %s\n", name,
			common.CommandApplicationController, common.CommandRepoServer, common.CommandGitAskPass)
		os.Exit(2)
	}
	if err := command.Execute(); err != nil {
		os.Exit(1)
	}
}
