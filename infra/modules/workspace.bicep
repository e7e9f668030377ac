// The Azure ML workspace and the resources every workspace needs: a storage account (its
// default datastores), a key vault, Application Insights (on a Log Analytics workspace) and a
// container registry (where the sslpipe-train and sslpipe-cpu images are built).

@description('Azure region of the workspace and its resources.')
param location string

@description('Name of the Azure ML workspace.')
param workspaceName string

@description('Name of the workspace storage account (3-24 lowercase letters and digits).')
param storageAccountName string

@description('Name of the key vault (3-24 letters, digits and hyphens).')
param keyVaultName string

@description('Name of the container registry (5-50 letters and digits).')
param containerRegistryName string

@description('Name shared by the Log Analytics workspace and Application Insights.')
param monitoringName string

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

// Access policies, not RBAC: the workspace adds its own policy when it is created.
resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    accessPolicies: []
    enableSoftDelete: true
  }
}

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: monitoringName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: monitoringName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
  }
}

// No admin user: the workspace and the clusters' identity pull with Entra ID (AcrPull).
resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: containerRegistryName
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    adminUserEnabled: false
  }
}

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  name: workspaceName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  sku: {
    name: 'Basic'
    tier: 'Basic'
  }
  properties: {
    friendlyName: workspaceName
    storageAccount: storage.id
    keyVault: keyVault.id
    applicationInsights: appInsights.id
    containerRegistry: registry.id
    publicNetworkAccess: 'Enabled'
  }
}

output workspaceName string = workspace.name
output containerRegistryName string = registry.name
