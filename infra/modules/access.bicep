// What the clusters' identity may do, and nothing more: read blobs in the images account,
// read documents in the Cosmos DB account, and pull the environment images from the
// workspace's registry.

@description('Principal (object) id of the clusters\' user-assigned identity.')
param principalId string

@description('Name of the images storage account.')
param imagesStorageAccountName string

@description('Name of the Cosmos DB account.')
param cosmosAccountName string

@description('Name of the workspace\'s container registry.')
param containerRegistryName string

// Built-in role definition ids (the same in every tenant).
var storageBlobDataReaderRoleId = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
var acrPullRoleId = '7f951dda-4ed3-4680-a7ca-43fe172d538d'
// Cosmos DB data-plane role "Cosmos DB Built-in Data Reader" (a Cosmos SQL role, not Azure RBAC).
var cosmosDataReaderRoleId = '00000000-0000-0000-0000-000000000001'

resource imagesStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: imagesStorageAccountName
}

resource cosmos 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' existing = {
  name: cosmosAccountName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: containerRegistryName
}

resource blobReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: imagesStorage
  name: guid(imagesStorage.id, principalId, storageBlobDataReaderRoleId)
  properties: {
    roleDefinitionId: subscriptionResourceId(
      'Microsoft.Authorization/roleDefinitions',
      storageBlobDataReaderRoleId
    )
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: registry
  name: guid(registry.id, principalId, acrPullRoleId)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

resource cosmosReader 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: cosmos
  name: guid(cosmos.id, principalId, cosmosDataReaderRoleId)
  properties: {
    roleDefinitionId: '${cosmos.id}/sqlRoleDefinitions/${cosmosDataReaderRoleId}'
    principalId: principalId
    scope: cosmos.id
  }
}
