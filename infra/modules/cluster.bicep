// One Azure ML compute cluster that scales to zero and runs as the given user-assigned identity.

@description('Azure region of the cluster (the workspace\'s).')
param location string

@description('Name of the Azure ML workspace the cluster belongs to.')
param workspaceName string

@description('Name of the cluster, as configs/azure.yaml and the pipelines refer to it.')
param clusterName string

@description('VM size of each node.')
param vmSize string

@description('Largest number of nodes the cluster scales out to.')
@minValue(1)
param maxNodeCount int

@description('Idle time before an unused node is released, as an ISO 8601 duration (PT15M).')
param idleTimeBeforeScaleDown string

@description('Dedicated nodes, or cheaper low-priority nodes that Azure may take back.')
@allowed([
  'Dedicated'
  'LowPriority'
])
param vmPriority string

@description('Resource id of the user-assigned managed identity the nodes run as.')
param identityId string

@description('Tags put on the cluster.')
param tags object

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = {
  name: workspaceName
}

resource cluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  parent: workspace
  name: clusterName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    computeType: 'AmlCompute'
    computeLocation: location
    disableLocalAuth: true
    properties: {
      vmSize: vmSize
      vmPriority: vmPriority
      osType: 'Linux'
      remoteLoginPortPublicAccess: 'Disabled'
      scaleSettings: {
        // No node runs, and nothing is billed, while no job is queued.
        minNodeCount: 0
        maxNodeCount: maxNodeCount
        nodeIdleTimeBeforeScaleDown: idleTimeBeforeScaleDown
      }
    }
  }
}

output clusterName string = cluster.name
