// Where the catalog lives: a storage account with the images' blob container, and a Cosmos DB
// (NoSQL) account with one metadata document per image.

@description('Azure region of the storage and Cosmos DB accounts.')
param location string

@description('Name of the images storage account (3-24 lowercase letters and digits).')
param storageAccountName string

@description('Name of the blob container that holds the images.')
param imagesContainerName string

@description('Name of the Cosmos DB account (3-44 lowercase letters, digits and hyphens).')
param cosmosAccountName string

@description('Name of the Cosmos DB database.')
param cosmosDatabaseName string

@description('Name of the Cosmos DB container with the metadata documents.')
param cosmosContainerName string

@description('Partition key path of the Cosmos DB container.')
param cosmosPartitionKeyPath string

@description('Tags put on every resource.')
param tags object

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource imagesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: imagesContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Serverless: a catalog is read in bursts (one query per pipeline run), so no provisioned
// throughput sits idle between runs.
resource cosmos 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  name: cosmosAccountName
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    capabilities: [
      {
        name: 'EnableServerless'
      }
    ]
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: cosmos
  name: cosmosDatabaseName
  properties: {
    resource: {
      id: cosmosDatabaseName
    }
  }
}

resource container 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: cosmosContainerName
  properties: {
    resource: {
      id: cosmosContainerName
      partitionKey: {
        paths: [
          cosmosPartitionKeyPath
        ]
        kind: 'Hash'
      }
    }
  }
}

output storageAccountName string = storage.name
output imagesBlobUri string = '${storage.properties.primaryEndpoints.blob}${imagesContainer.name}'
output cosmosAccountName string = cosmos.name
output cosmosEndpoint string = cosmos.properties.documentEndpoint
output cosmosDatabaseName string = database.name
output cosmosContainerName string = container.name
