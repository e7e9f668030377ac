// sslpipe on Azure: the Azure ML workspace, the catalog's storage (images in Blob Storage,
// metadata in Cosmos DB), a CPU and a GPU cluster that scale to zero, and the user-assigned
// identity the clusters run as, allowed to read the catalog and nothing else.
//
//   az deployment group create -g RG -f infra/main.bicep -p infra/main.parameters.json
//
// The outputs are the values configs/azure.yaml asks for (see infra/README.md).

targetScope = 'resourceGroup'

@description('Azure region of every resource (default: the resource group\'s).')
param location string = resourceGroup().location

@description('Short prefix of the generated resource names (lowercase letters and digits).')
@minLength(3)
@maxLength(10)
param namePrefix string = 'sslpipe'

@description('Name of the Azure ML workspace (configs/azure.yaml azureml.workspace_name).')
param workspaceName string = '${namePrefix}-ws'

@description('Name of the blob container that holds the images.')
param imagesContainerName string = 'images'

@description('Name of the Cosmos DB database.')
param cosmosDatabaseName string = 'sslpipe'

@description('Name of the Cosmos DB container with one metadata document per image.')
param cosmosContainerName string = 'images'

@description('Partition key path of the Cosmos DB container (sslpipe\'s store expects /id).')
param cosmosPartitionKeyPath string = '/id'

@description('Name of the CPU cluster (configs/azure.yaml azureml.cpu_compute).')
param cpuClusterName string = 'cpu-cluster'

@description('VM size of the CPU cluster\'s nodes.')
param cpuVmSize string = 'Standard_DS3_v2'

@description('Largest number of CPU nodes.')
@minValue(1)
param cpuMaxNodes int = 4

@description('Name of the GPU cluster (configs/azure.yaml azureml.gpu_compute).')
param gpuClusterName string = 'gpu-cluster'

@description('VM size of the GPU cluster\'s nodes (one T4; Standard_NC24ads_A100_v4 for one A100).')
param gpuVmSize string = 'Standard_NC4as_T4_v3'

@description('Largest number of GPU nodes (moco.nodes may not exceed it).')
@minValue(1)
param gpuMaxNodes int = 2

@description('Dedicated or low-priority GPU nodes (low priority costs less and may be evicted).')
@allowed([
  'Dedicated'
  'LowPriority'
])
param gpuVmPriority string = 'Dedicated'

@description('Idle time before a cluster releases an unused node, as an ISO 8601 duration.')
param idleTimeBeforeScaleDown string = 'PT15M'

@description('Tags put on every resource.')
param tags object = {
  project: 'sslpipe'
}

// Globally unique names for the resources that need them, stable for one resource group.
var token = uniqueString(resourceGroup().id, namePrefix)
var compactPrefix = toLower(replace(namePrefix, '-', ''))

resource clusterIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${namePrefix}-clusters'
  location: location
  tags: tags
}

module workspace 'modules/workspace.bicep' = {
  name: 'workspace'
  params: {
    location: location
    workspaceName: workspaceName
    storageAccountName: take('${compactPrefix}ws${token}', 24)
    keyVaultName: take('${compactPrefix}-kv-${token}', 24)
    containerRegistryName: '${compactPrefix}acr${token}'
    monitoringName: '${namePrefix}-monitoring'
    tags: tags
  }
}

module data 'modules/data.bicep' = {
  name: 'data'
  params: {
    location: location
    storageAccountName: take('${compactPrefix}img${token}', 24)
    imagesContainerName: imagesContainerName
    cosmosAccountName: '${compactPrefix}-cosmos-${token}'
    cosmosDatabaseName: cosmosDatabaseName
    cosmosContainerName: cosmosContainerName
    cosmosPartitionKeyPath: cosmosPartitionKeyPath
    tags: tags
  }
}

module access 'modules/access.bicep' = {
  name: 'access'
  params: {
    principalId: clusterIdentity.properties.principalId
    imagesStorageAccountName: data.outputs.storageAccountName
    cosmosAccountName: data.outputs.cosmosAccountName
    containerRegistryName: workspace.outputs.containerRegistryName
  }
}

module cpuCluster 'modules/cluster.bicep' = {
  name: 'cpu-cluster'
  params: {
    location: location
    workspaceName: workspace.outputs.workspaceName
    clusterName: cpuClusterName
    vmSize: cpuVmSize
    maxNodeCount: cpuMaxNodes
    idleTimeBeforeScaleDown: idleTimeBeforeScaleDown
    vmPriority: 'Dedicated'
    identityId: clusterIdentity.id
    tags: tags
  }
}

module gpuCluster 'modules/cluster.bicep' = {
  name: 'gpu-cluster'
  params: {
    location: location
    workspaceName: workspace.outputs.workspaceName
    clusterName: gpuClusterName
    vmSize: gpuVmSize
    maxNodeCount: gpuMaxNodes
    idleTimeBeforeScaleDown: idleTimeBeforeScaleDown
    vmPriority: gpuVmPriority
    identityId: clusterIdentity.id
    tags: tags
  }
}

// configs/azure.yaml
@description('azureml.subscription_id')
output subscriptionId string = subscription().subscriptionId

@description('azureml.resource_group')
output resourceGroupName string = resourceGroup().name

@description('azureml.workspace_name')
output workspaceName string = workspace.outputs.workspaceName

@description('azureml.cpu_compute')
output cpuClusterName string = cpuCluster.outputs.clusterName

@description('azureml.gpu_compute')
output gpuClusterName string = gpuCluster.outputs.clusterName

@description('stores.blob_uri')
output imagesBlobUri string = data.outputs.imagesBlobUri

@description('stores.metadata_uri')
output metadataUri string = 'cosmos://${data.outputs.cosmosAccountName}.documents.azure.com/${data.outputs.cosmosDatabaseName}/${data.outputs.cosmosContainerName}'

@description('Cosmos DB endpoint (https://ACCOUNT.documents.azure.com:443/).')
output cosmosEndpoint string = data.outputs.cosmosEndpoint

@description('Client id of the clusters\' identity: AZURE_CLIENT_ID for DefaultAzureCredential in jobs.')
output clusterIdentityClientId string = clusterIdentity.properties.clientId
