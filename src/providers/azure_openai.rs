//! Azure OpenAI through async-openai's `AzureConfig`:
//! `POST {api_base}/openai/deployments/{deployment}/chat/completions?api-version=…` with the
//! `api-key` header. A request's `model` names another deployment.

use async_openai::config::AzureConfig;

use super::openai::{Compatible, MaxTokensField};
use super::{
    ChatRequest, ChatResponse, OpenedStream, Provider, ProviderError, check_api_key, http_client,
};
use crate::config::{AzureSettings, ConfigError};

/// Azure OpenAI, one resource; deployments chosen per request.
pub struct AzureOpenAiProvider {
    base: Compatible<AzureConfig>,
    api_base: String,
    api_key: String,
    api_version: String,
}

impl AzureOpenAiProvider {
    /// Builds the provider; `AZURE_OPENAI_API_KEY` and `AZURE_OPENAI_API_BASE` are required.
    pub fn from_settings(s: &AzureSettings) -> Result<Self, ConfigError> {
        let key = s.api_key.as_ref().ok_or_else(|| {
            ConfigError::missing("AZURE_OPENAI_API_KEY", "LLM_PROVIDER is azure_openai")
        })?;
        check_api_key("AZURE_OPENAI_API_KEY", key.expose())?;
        let api_base = s.api_base.clone().ok_or_else(|| {
            ConfigError::missing(
                "AZURE_OPENAI_API_BASE",
                "LLM_PROVIDER is azure_openai; e.g. https://NAME.openai.azure.com",
            )
        })?;
        let config = azure_config(&api_base, key.expose(), &s.deployment, &s.api_version);
        Ok(Self {
            base: Compatible {
                name: "azure_openai",
                config,
                http: http_client()?,
                model: s.deployment.clone(),
                max_tokens: s.max_tokens,
                temperature: s.temperature,
                max_tokens_field: MaxTokensField::MaxTokens,
            },
            api_base,
            api_key: key.expose().to_owned(),
            api_version: s.api_version.clone(),
        })
    }
}

impl AzureOpenAiProvider {
    /// The engine for a request naming another deployment of the same resource (same engine,
    /// another URL); `None` for the configured one.
    fn other_deployment(&self, request: &ChatRequest) -> Option<Compatible<AzureConfig>> {
        let deployment = request.model.as_deref()?;
        (deployment != self.base.model).then(|| Compatible {
            name: self.base.name,
            config: azure_config(&self.api_base, &self.api_key, deployment, &self.api_version),
            http: self.base.http.clone(),
            model: deployment.to_owned(),
            max_tokens: self.base.max_tokens,
            temperature: self.base.temperature,
            max_tokens_field: MaxTokensField::MaxTokens,
        })
    }
}

fn azure_config(api_base: &str, key: &str, deployment: &str, api_version: &str) -> AzureConfig {
    AzureConfig::new()
        .with_api_base(api_base)
        .with_api_key(key)
        .with_deployment_id(deployment)
        .with_api_version(api_version)
}

#[async_trait::async_trait]
impl Provider for AzureOpenAiProvider {
    fn name(&self) -> &'static str {
        self.base.name
    }

    fn default_model(&self) -> &str {
        &self.base.model
    }

    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        match self.other_deployment(&request) {
            Some(other) => other.chat_once(request).await,
            None => self.base.chat_once(request).await,
        }
    }

    async fn chat_stream(&self, request: ChatRequest) -> Result<OpenedStream, ProviderError> {
        match self.other_deployment(&request) {
            Some(other) => other.chat_stream_once(request).await,
            None => self.base.chat_stream_once(request).await,
        }
    }
}
